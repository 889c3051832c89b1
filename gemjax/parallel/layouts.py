"""Sequence layouts for ring attention: which tokens each context shard holds.

Under the causal mask a contiguous split is unbalanced: the shard with the
first T/N tokens has 1 visible key shard, the last one has N. A layout is a
permutation of every row's tokens, applied by the data pipeline *before* the
batch is split over the 'context' axis:

  contiguous  shard d holds tokens [d T/N, (d+1) T/N)             (identity)
  zigzag      the row is cut into 2N chunks; shard d holds chunks d and
              2N-1-d, one early and one late (Llama-3 context parallelism,
              Meta 2024; haoliuhl/ringattention's load balancing)
  striped     shard d holds tokens d, d+N, d+2N, ... (Brandon et al. 2023,
              "Striped Attention")

The model never assumes array order: causal masks compare the 'token_index'
key that `apply_layout` adds (each token's original index in its row), RoPE
reads 'positions', and the loss is a sum over tokens. Outputs that are
per-token (logits, hidden states) come back in layout order; `undo_layout`
restores the original order.

This module is numpy only (host side), plus a load-balance count used by the
benchmark and the tests. It imports gemjax.batch (numpy only) for which keys
are per-token.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from gemjax import batch as batch_lib

LAYOUTS = ('contiguous', 'zigzag', 'striped')
TOKEN_INDEX_KEY = 'token_index'   # in gemjax.batch.KEYS


def layout_permutation(seq_len: int, num_shards: int, layout: str) -> np.ndarray:
  """perm [T]: position p of the laid-out row holds original token perm[p]."""
  T, N = seq_len, num_shards
  if layout == 'contiguous' or N == 1:
    return np.arange(T, dtype=np.int32)
  if layout == 'zigzag':
    if T % (2 * N):
      raise ValueError(f"layout 'zigzag' needs seq_len={T} divisible by "
                       f'2 * context={2 * N}')
    chunks = np.arange(T, dtype=np.int32).reshape(2 * N, T // (2 * N))
    order = [c for d in range(N) for c in (d, 2 * N - 1 - d)]
    return chunks[order].reshape(-1)
  if layout == 'striped':
    if T % N:
      raise ValueError(f"layout 'striped' needs seq_len={T} divisible by context={N}")
    return np.arange(T, dtype=np.int32).reshape(T // N, N).T.reshape(-1)
  raise ValueError(f'unknown layout {layout!r}; one of {LAYOUTS}')


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
  """inv with inv[perm[p]] = p: where each original token went."""
  perm = np.asarray(perm)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(len(perm), dtype=perm.dtype)
  return inv


def target_modality(modality_BxT: np.ndarray) -> np.ndarray:
  """int8 [B, T]: the modality of the token each position predicts
  (modality[:, i + 1]; the last position, which has no next token, keeps its own)."""
  m = np.asarray(modality_BxT)
  return np.concatenate([m[:, 1:], m[:, -1:]], axis=1).astype(np.int8)


def apply_permutation(batch: Mapping[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
  """Permutes every per-token array of a batch along T (axis 1).

  Which keys move is the batch contract's (`gemjax.batch.KEYS`): per-token
  keys, logical axes ('batch', 'length', ...), are permuted (tokens,
  positions, segment_ids, block_ids, targets, loss_weights, modality,
  token_index, target_modality); keys whose values point into T (`*_slots`) get their values
  mapped to the new positions (-1 padding stays -1); patches do not move. A
  key the contract lacks is an error. Adds 'token_index' [B, T] int32 with
  each token's original index (or permutes an existing one, so layouts
  compose) and 'target_modality' (the modality each target has in the
  original order, which the per-modality loss metrics need).
  """
  perm = np.asarray(perm, np.int64)
  B, T = batch['tokens'].shape
  if perm.shape != (T,):
    raise ValueError(f'layout permutation has shape {perm.shape}, expected ({T},)')
  inv = inverse_permutation(perm)
  batch = dict(batch)
  if 'target_modality' not in batch and 'modality' in batch:
    # The loss groups targets by the modality of the token they predict, the
    # next one in the ORIGINAL order: fix it now, before T is permuted.
    batch['target_modality'] = target_modality(np.asarray(batch['modality']))
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    spec = batch_lib.key_spec(key)
    if spec.points_into_length:
      out[key] = np.where(value >= 0, inv[np.clip(value, 0, T - 1)], value).astype(value.dtype)
    elif batch_lib.is_per_token(key):
      out[key] = value[:, perm]
    else:
      out[key] = value
  if TOKEN_INDEX_KEY not in batch:
    out[TOKEN_INDEX_KEY] = np.broadcast_to(perm.astype(np.int32), (B, T)).copy()
  return out


def apply_layout(batch: Mapping[str, np.ndarray], layout: str,
                 num_shards: int) -> dict[str, np.ndarray]:
  """The data pipeline's hook: lays out a host batch for `num_shards` context shards."""
  T = batch['tokens'].shape[1]
  return apply_permutation(batch, layout_permutation(T, num_shards, layout))


def undo_layout(x, perm: np.ndarray, axis: int = 1):
  """Restores original token order of a per-token output (numpy or jax array)."""
  inv = inverse_permutation(np.asarray(perm))
  return x.take(inv, axis=axis) if isinstance(x, np.ndarray) else _jax_take(x, inv, axis)


def _jax_take(x, idx, axis):
  import jax.numpy as jnp  # local: keep this module numpy-only for the pipeline
  return jnp.take(x, jnp.asarray(idx), axis=axis)


# ------------------------------------------------------------ load balance


def _any_visible(q_idx: np.ndarray, k_idx: np.ndarray, causal: bool, window: int) -> bool:
  """Does any (query, key) pair of these original indices pass the mask?"""
  q = np.sort(q_idx)
  if not causal and not window:
    return True
  if not causal:  # only q - k < window: some key above q - window
    return bool(k_idx.max() > q.min() - window)
  # causal (+ window): for each key, the first query at or after it.
  pos = np.searchsorted(q, k_idx, side='left')
  has = pos < len(q)
  if not window:
    return bool(has.any())
  nearest = q[np.minimum(pos, len(q) - 1)]
  return bool((has & (nearest - k_idx < window)).any())


def block_work(seq_len: int, num_shards: int, layout: str, block: int, *,
               causal: bool = True, window: int = 0) -> dict[str, np.ndarray]:
  """Per-shard work of ring attention on one document of `seq_len` tokens.

  Returns 'steps' [N]: ring steps with anything visible (what the per-step
  skip leaves), 'blocks' [N]: (query chunk, key chunk) pairs of size `block`
  that are not fully masked (what the kernel computes), and 'pairs' [N]:
  visible (query, key) pairs (the useful FLOPs).
  """
  perm = layout_permutation(seq_len, num_shards, layout)
  local = seq_len // num_shards
  shards = perm.reshape(num_shards, local)
  n_chunks = -(-local // block)
  chunks = [[s[c * block:(c + 1) * block] for c in range(n_chunks)] for s in shards]
  steps = np.zeros(num_shards, np.int64)
  blocks = np.zeros(num_shards, np.int64)
  pairs = np.zeros(num_shards, np.int64)
  for d in range(num_shards):
    for e in range(num_shards):
      any_step = False
      for qc in chunks[d]:
        for kc in chunks[e]:
          if _any_visible(qc, kc, causal, window):
            blocks[d] += 1
            any_step = True
      steps[d] += any_step
      k = np.sort(shards[e])
      q = shards[d]
      upto = np.searchsorted(k, q, side='right') if causal else np.full(len(q), len(k))
      below = np.searchsorted(k, q - window, side='right') if window else 0
      pairs[d] += int(np.sum(upto - below))
  return {'steps': steps, 'blocks': blocks, 'pairs': pairs}
