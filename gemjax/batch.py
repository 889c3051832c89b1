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

| token_index      | [B, T] int32          | each token's index in its row before a ring layout |
|                  |                       | permuted T (optional; gemjax.parallel.layouts)     |
| target_modality  | [B, T] int8           | modality of targets[i] (of token i+1), taken before |
|                  |                       | a layout permutes T (optional; without it the loss  |
|                  |                       | reads modality[i+1] in array order)                 |

Positions, segment ids and block ids are computed on the host and travel with
the tokens through packing, sharding and layouts; nothing downstream derives
them again.

The table above is also data: `KEYS` gives every key's rank, dtype, logical
axes (what `gemjax.parallel.sharding` maps to mesh axes), padding value, and
whether its values point into T. Packing, collate, the eval padding, layouts
and the sharding of batches read it from here.

This module imports only numpy (and the standard library) and may be
imported from anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

TEXT, IMAGE, AUDIO, VIDEO, IMAGE_CODE = 0, 1, 2, 3, 4
MODALITY_NAMES = ('text', 'image', 'audio', 'video', 'image_code')
CONTINUOUS_MODALITIES = ('image', 'audio', 'video')

PAD_ID = 0  # the default padding id of tokens / targets (the layout's pad)


@dataclasses.dataclass(frozen=True)
class KeySpec:
  """What one batch key holds.

  Attributes:
    rank: number of dimensions, B first.
    dtype: the numpy dtype on the host.
    axes: logical axis names, one per dimension ('batch', 'length' or None).
    fill: value of a padding entry; None for tokens / targets (the pad id).
    required: every batch carries it.
    points_into_length: values are indices into T (-1 = none), so a
      permutation of T must remap them (slots).
  """

  rank: int
  dtype: np.dtype
  axes: tuple[str | None, ...]
  fill: Any = 0
  required: bool = False
  points_into_length: bool = False


_PER_TOKEN = ('batch', 'length')
_I32, _I8, _F32 = np.dtype(np.int32), np.dtype(np.int8), np.dtype(np.float32)


def _patch_specs() -> dict[str, KeySpec]:
  out = {}
  for m in CONTINUOUS_MODALITIES:
    out[f'{m}_patches'] = KeySpec(3, _F32, ('batch', None, None), fill=0.0)
    out[f'{m}_slots'] = KeySpec(2, _I32, ('batch', None), fill=-1,
                                points_into_length=True)
  return out


# Every key a batch may carry (see the module docstring for the meanings).
KEYS: dict[str, KeySpec] = {
    'tokens': KeySpec(2, _I32, _PER_TOKEN, fill=None, required=True),
    'modality': KeySpec(2, _I8, _PER_TOKEN, required=True),
    'positions': KeySpec(3, _I32, ('batch', 'length', None), required=True),
    'segment_ids': KeySpec(2, _I32, _PER_TOKEN, required=True),
    'block_ids': KeySpec(2, _I32, _PER_TOKEN, required=True),
    'targets': KeySpec(2, _I32, _PER_TOKEN, fill=None, required=True),
    'loss_weights': KeySpec(2, _F32, _PER_TOKEN, fill=0.0, required=True),
    'token_index': KeySpec(2, _I32, _PER_TOKEN),
    'target_modality': KeySpec(2, _I8, _PER_TOKEN),
    **_patch_specs(),
}

# key -> (rank, dtype) for the keys every batch carries.
REQUIRED_KEYS: dict[str, tuple[int, np.dtype]] = {
    k: (s.rank, s.dtype) for k, s in KEYS.items() if s.required}


def key_spec(key: str) -> KeySpec:
  """The KeySpec of `key`; ValueError naming the key if the contract lacks it."""
  spec = KEYS.get(key)
  if spec is None:
    raise ValueError(f'batch key {key!r} is not in the batch contract '
                     f'(gemjax.batch.KEYS: {sorted(KEYS)}); add it there')
  return spec


def logical_axes(key: str) -> tuple[str | None, ...]:
  """Logical axis names of batch key `key`, one per dimension."""
  return key_spec(key).axes


def is_per_token(key: str) -> bool:
  """Is `key` laid out [B, T, ...] (one entry per token, moves with tokens)?"""
  return key_spec(key).axes[:2] == _PER_TOKEN


def patch_keys(modality: str) -> tuple[str, str]:
  """The (patches, slots) keys of a continuous modality."""
  return f'{modality}_patches', f'{modality}_slots'


def patch_budgets(data_cfg) -> dict[str, int]:
  """modality -> P_m from a data config section (`image_patches`, ...);
  modalities with budget 0 are left out (they get no batch keys)."""
  out = {}
  for m in CONTINUOUS_MODALITIES:
    n = int(getattr(data_cfg, f'{m}_patches', 0) or 0)
    if n > 0:
      out[m] = n
  return out


def patch_dims(model_cfg) -> dict[str, int]:
  """modality -> D_m from a model config section (`image_patch_dim`, ...);
  modalities with size 0 (no embedder) are left out."""
  out = {}
  for m in CONTINUOUS_MODALITIES:
    d = int(getattr(model_cfg, f'{m}_patch_dim', 0) or 0)
    if d > 0:
      out[m] = d
  return out


def empty_batch(batch_size: int, seq_len: int,
                patch_budgets: Mapping[str, int] | None = None,
                patch_dims: Mapping[str, int] | None = None,
                pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """An all-padding batch [B, T] of the contract.

  Tokens and targets are `pad_id`, segment ids 0 (padding), loss weights 0,
  positions / modality / block ids 0; every modality named in `patch_budgets`
  (budget 0 included: `patch_budgets()` already leaves those out) gets zero
  patches [B, P_m, D_m] and slots -1. The arrays are fresh and writable:
  builders fill real rows in.
  """
  B, T = int(batch_size), int(seq_len)
  budgets = dict(patch_budgets or {})
  dims = dict(patch_dims or {})
  out = {}
  for key, spec in KEYS.items():
    if spec.required:
      shape = (B, T) + (3,) * (spec.rank - 2)
      fill = pad_id if spec.fill is None else spec.fill
      out[key] = np.full(shape, fill, spec.dtype)
  for m, p in budgets.items():
    if m not in CONTINUOUS_MODALITIES:
      raise ValueError(f'patch_budgets has unknown modality {m!r}; valid: '
                       f'{CONTINUOUS_MODALITIES}')
    if m not in dims:
      raise ValueError(f'patch_budgets[{m!r}] = {p} needs patch_dims[{m!r}]')
    pk, sk = patch_keys(m)
    out[pk] = np.full((B, int(p), int(dims[m])), KEYS[pk].fill, KEYS[pk].dtype)
    out[sk] = np.full((B, int(p)), KEYS[sk].fill, KEYS[sk].dtype)
  return out


def empty_row(seq_len: int, patch_budgets: Mapping[str, int] | None = None,
              patch_dims: Mapping[str, int] | None = None,
              pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """One all-padding row (no batch dimension): `empty_batch` of one, unbatched."""
  return {k: v[0] for k, v in
          empty_batch(1, seq_len, patch_budgets, patch_dims, pad_id).items()}


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
  for key, spec in KEYS.items():   # optional keys, when present
    if spec.required or key not in batch:
      continue
    arr = batch[key]
    lead = (B, T) if is_per_token(key) else (B,)
    if arr.ndim != spec.rank or tuple(arr.shape[:len(lead)]) != lead:
      raise ValueError(f'{where}: {key} has shape {tuple(arr.shape)}, expected '
                       f'rank {spec.rank} starting {list(lead)}')
    if np.dtype(arr.dtype) != spec.dtype:
      raise ValueError(f'{where}: {key} has dtype {arr.dtype}, expected {spec.dtype}')
  for m in CONTINUOUS_MODALITIES:
    pk, sk = patch_keys(m)
    if (pk in batch) != (sk in batch):
      raise ValueError(f'{where}: {pk} and {sk} must come together')
    if pk in batch and batch[pk].shape[:2] != batch[sk].shape:
      raise ValueError(f'{where}: {pk} {batch[pk].shape} does not match '
                       f'{sk} {batch[sk].shape}')
