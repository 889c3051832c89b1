"""The one attention mask every kernel implements.

    visible(i, j) = same segment
                    AND (index_j <= index_i  OR  same nonzero block)   [causal]
                    AND (window == 0 OR index_i - index_j < window OR same block)

The window is one-sided: it bounds how far back a query looks
(index_i - index_j < window) and never how far ahead. With causal=True that
is the usual sliding window (the `window` most recent tokens, itself
included); with causal=False a query sees every later key of its segment
plus the `window` - 1 before it, not a symmetric band |index_i - index_j| <
window. Splash's non-causal local mask is the same left-only window, and
cuDNN (a left window only together with the causal mask) falls back to
'blockwise' there, so every kernel agrees. The decoder's windows are causal.

Segments are packed documents (0 = padding, which only sees padding, so no
row is empty and nothing leaks); blocks are bidirectional media blocks;
`index` is each token's place in its row before any layout permutation
(ring attention's zigzag), so causality never depends on array order.

Kernels read the three arrays by attribute from any object that has them
(`MaskInfo` here, or the model's `SequenceInfo`). Imports jax only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


class MaskInfo(NamedTuple):
  """The per-token arrays the mask reads, each [B, T] int32."""
  segment_ids_BxT: jax.Array
  block_ids_BxT: jax.Array
  index_BxT: jax.Array


def mask_info(info) -> MaskInfo:
  """The mask arrays of anything that carries them (e.g. a SequenceInfo)."""
  return MaskInfo(info.segment_ids_BxT, info.block_ids_BxT, info.index_BxT)


def visible_mask(q_seg_BxT, kv_seg_BxS, q_blk_BxT, kv_blk_BxS, q_idx_BxT,
                 kv_idx_BxS, *, causal: bool, window: int) -> jax.Array:
  """The boolean [B, T, S] mask of the module docstring (any query/key subset)."""
  same_seg = q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :]
  same_blk = (q_blk_BxT[:, :, None] == kv_blk_BxS[:, None, :]) & (q_blk_BxT[:, :, None] != 0)
  delta = q_idx_BxT[:, :, None] - kv_idx_BxS[:, None, :]
  ok = same_seg
  if causal:
    ok = ok & ((delta >= 0) | same_blk)
  if window:
    ok = ok & ((delta < window) | same_blk)
  return ok


def full_mask(q_mask, kv_mask, *, causal: bool, window: int) -> jax.Array:
  """`visible_mask` of two mask infos: [B, T, S]."""
  return visible_mask(q_mask.segment_ids_BxT, kv_mask.segment_ids_BxT,
                      q_mask.block_ids_BxT, kv_mask.block_ids_BxT,
                      q_mask.index_BxT, kv_mask.index_BxT, causal=causal, window=window)
