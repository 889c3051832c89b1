"""The batch contract: the one place that says what a batch holds.

Every batch that reaches the model is a dict of fixed-shape numpy (host) or
jax (device) arrays. B is the batch, T the sequence length, P_m the per-batch
patch budget of modality m and D_m its flattened patch size.

| key              | shape, dtype          | meaning                                           |
|------------------|-----------------------|---------------------------------------------------|
| tokens           | [B, T] int32          | text ids, special ids, image-code ids; PLACEHOLDER |
|                  |                       | id where a continuous embedding is scattered in    |
| modality         | [B, T] int8           | 0 text, 1 image, 2 audio, 3 video, 4 image code    |
| positions        | [B, T, 3] int32       | (t, h, w) for multimodal RoPE; text has t=h=w      |
| segment_ids      | [B, T] int32          | packed-document id, 0 = padding                    |
| block_ids        | [B, T] int32          | nonzero id shared by the tokens of one image /     |
|                  |                       | audio block (bidirectional inside), 0 elsewhere    |
| targets          | [B, T] int32          | next-token target for position i (tokens[i+1])     |
| loss_weights     | [B, T] float32        | weight of the loss at position i (0 = no loss)     |
| image_patches    | [B, P_i, D_i] float32 | continuous image patches (optional key)            |
| image_slots      | [B, P_i] int32        | index in T of each patch, -1 = padding             |
| audio_patches / audio_slots, video_patches / video_slots: the same for audio, video |

Positions, segment ids and block ids are computed on the host and travel with
the tokens through packing, sharding and layouts; nothing downstream derives
them again.

This module imports only numpy and may be imported from anywhere.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

TEXT, IMAGE, AUDIO, VIDEO, IMAGE_CODE = 0, 1, 2, 3, 4
MODALITY_NAMES = ('text', 'image', 'audio', 'video', 'image_code')
CONTINUOUS_MODALITIES = ('image', 'audio', 'video')

# key -> (rank, dtype) for the keys every batch carries.
REQUIRED_KEYS: dict[str, tuple[int, np.dtype]] = {
    'tokens': (2, np.dtype(np.int32)),
    'modality': (2, np.dtype(np.int8)),
    'positions': (3, np.dtype(np.int32)),
    'segment_ids': (2, np.dtype(np.int32)),
    'block_ids': (2, np.dtype(np.int32)),
    'targets': (2, np.dtype(np.int32)),
    'loss_weights': (2, np.dtype(np.float32)),
}


def patch_keys(modality: str) -> tuple[str, str]:
  """The (patches, slots) keys of a continuous modality."""
  return f'{modality}_patches', f'{modality}_slots'


def text_batch(tokens_BxT: np.ndarray, segment_ids_BxT: np.ndarray | None = None,
               loss_mask_BxT: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Builds a text-only batch in the contract from token ids.

  `targets[i] = tokens[i + 1]` inside a segment; the last token of each segment
  (and padding) gets weight 0, so a packed row never predicts across documents.
  Positions restart at 0 in each segment (t = h = w for text).
  """
  tokens_BxT = np.asarray(tokens_BxT, np.int32)
  B, T = tokens_BxT.shape
  if segment_ids_BxT is None:
    segment_ids_BxT = np.ones((B, T), np.int32)
  segment_ids_BxT = np.asarray(segment_ids_BxT, np.int32)
  targets = np.zeros((B, T), np.int32)
  targets[:, :-1] = tokens_BxT[:, 1:]
  same_next = np.zeros((B, T), bool)
  same_next[:, :-1] = (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1])
  weights = (same_next & (segment_ids_BxT > 0)).astype(np.float32)
  if loss_mask_BxT is not None:
    weights *= np.asarray(loss_mask_BxT, np.float32)
  pos = segment_positions(segment_ids_BxT)
  return {
      'tokens': tokens_BxT,
      'modality': np.zeros((B, T), np.int8),
      'positions': np.repeat(pos[..., None], 3, axis=-1).astype(np.int32),
      'segment_ids': segment_ids_BxT,
      'block_ids': np.zeros((B, T), np.int32),
      'targets': targets,
      'loss_weights': weights,
  }


def segment_positions(segment_ids_BxT: np.ndarray) -> np.ndarray:
  """0, 1, 2, ... restarting at every change of segment id (padding too)."""
  seg = np.asarray(segment_ids_BxT)
  B, T = seg.shape
  idx = np.broadcast_to(np.arange(T), (B, T))
  start = np.ones((B, T), bool)
  start[:, 1:] = seg[:, 1:] != seg[:, :-1]
  first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
  return (idx - first).astype(np.int32)


def validate_batch(batch: Mapping[str, np.ndarray], *, where: str = 'batch') -> None:
  """Raises ValueError naming the key if `batch` breaks the contract."""
  missing = [k for k in REQUIRED_KEYS if k not in batch]
  if missing:
    raise ValueError(f'{where}: missing keys {missing}; a batch needs '
                     f'{sorted(REQUIRED_KEYS)}')
  B, T = batch['tokens'].shape
  for key, (rank, dtype) in REQUIRED_KEYS.items():
    arr = batch[key]
    if arr.ndim != rank or tuple(arr.shape[:2]) != (B, T):
      raise ValueError(f'{where}: {key} has shape {tuple(arr.shape)}, expected '
                       f'[{B}, {T}' + (', 3]' if rank == 3 else ']'))
    if np.dtype(arr.dtype) != dtype:
      raise ValueError(f'{where}: {key} has dtype {arr.dtype}, expected {dtype}')
  for m in CONTINUOUS_MODALITIES:
    pk, sk = patch_keys(m)
    if (pk in batch) != (sk in batch):
      raise ValueError(f'{where}: {pk} and {sk} must come together')
    if pk in batch and batch[pk].shape[:2] != batch[sk].shape:
      raise ValueError(f'{where}: {pk} {batch[pk].shape} does not match '
                       f'{sk} {batch[sk].shape}')
