"""Fused platform kernels: cuDNN attention (GPU) and Pallas splash (TPU).

Each comes with two tests the caller uses to decide whether it may run:
a static one (backend, dtype, shapes: checked at trace time) and a run-time
one on the batch's mask arrays (what the fused kernel's built-in masks can
express). Choosing the fallback is the caller's job (`gemjax.model.attention`);
these functions only run the fused kernels. Imports jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# cuDNN's packed layout takes each row's documents as up to this many
# sequences (padding's run counts as one). It also sizes the saved softmax
# statistics, [B * CUDNN_MAX_SEGMENTS, H, T] f32, so it is kept small; rows
# with more runs take the fallback.
CUDNN_MAX_SEGMENTS = 16


def cudnn_static_ok(q, k, causal: bool, window: int, platform: str | None = None) -> bool:
  """`platform`: what the program is traced for (default: this backend)."""
  if (platform or jax.default_backend()) != 'gpu':
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return False
  K = q.shape[-1]
  if K % 8 or K > 256:
    return False
  # cuDNN has only a left window, and only together with the causal mask.
  return (causal or not window) and hopper_or_later() and cudnn_version() >= 90600


def hopper_or_later() -> bool:
  """cuDNN's packed layout needs compute capability 9.0 (NVIDIA only; ROCm
  devices report 'gfx...' and are not)."""
  cap = getattr(jax.devices()[0], 'compute_capability', None)
  try:
    return cap is not None and tuple(int(x) for x in cap.split('.')[:2]) >= (9, 0)
  except ValueError:
    return False


def cudnn_version() -> int:
  """The cuDNN JAX was built against (e.g. 90800), 0 where there is none; the
  packed layout needs 9.6."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  try:
    return int(cudnn.check_cudnn_version())
  except RuntimeError:
    return 0


def cudnn_segments(segment_ids_BxT: jax.Array, max_segments: int = CUDNN_MAX_SEGMENTS):
  """The rows in cuDNN's packed layout: every run of equal segment ids (the
  padding run too: padding sees only padding, like a document) is one
  sequence.

  Returns (seqlen [B, M], offsets [B, M + 1], ok): run lengths and start
  positions, -1 past a row's last run (the layout `jax`'s cuDNN attention
  takes), and a scalar that is True when the layout describes gemjax's mask
  for every row: each segment id is one contiguous run and no row has more
  than M runs. Ids need not be increasing.
  """
  B, T = segment_ids_BxT.shape
  M = max_segments
  seg = segment_ids_BxT
  starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run_BxT = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1
  runs_B = run_BxT[:, -1] + 1
  rows = jnp.arange(B)[:, None]
  seqlen = jnp.zeros((B, M), jnp.int32).at[rows, run_BxT].add(1, mode='drop')
  seqlen = jnp.where(jnp.arange(M) < runs_B[:, None], seqlen, -1)
  t_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  slot = jnp.where(starts & (run_BxT < M), run_BxT, M + 1)      # M + 1: dropped
  offsets = jnp.full((B, M + 1), -1, jnp.int32).at[rows, slot].set(t_BxT, mode='drop')
  ordered = jnp.sort(seg, axis=1)
  ids_B = 1 + jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)
  ok = jnp.all((runs_B <= M) & (runs_B == ids_B))
  return seqlen, offsets, ok


def cudnn_mask_ok(mask, max_segments: int = CUDNN_MAX_SEGMENTS) -> jax.Array:
  """Run-time test: no bidirectional block, original order, and segments
  cuDNN's packed layout can carry (`cudnn_segments`)."""
  T = mask.index_BxT.shape[1]
  return (cudnn_segments(mask.segment_ids_BxT, max_segments)[2] &
          jnp.all(mask.block_ids_BxT == 0) &
          jnp.all(mask.index_BxT == jnp.arange(T, dtype=mask.index_BxT.dtype)))


def cudnn_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, causal: bool, window: int,
                    max_segments: int = CUDNN_MAX_SEGMENTS) -> jax.Array:
  """cuDNN fused attention over packed rows (GPU, 16-bit, Hopper or later).

  Each row's segments go to cuDNN as separate sequences (seqlen/offsets,
  `cudnn_segments`), so packing and padding are expressed exactly; the
  causal mask and the left window then apply within each one. Valid only
  where `cudnn_mask_ok(mask)` holds, and on one device's rows (the caller
  maps it per device: the offsets index the local batch).
  `jax.nn.dot_product_attention` has no packed-layout argument, so this calls
  the cuDNN entry point under it. That entry point scales the K/V offsets by
  the query's head count, so grouped K/V heads are repeated to the query's
  count first (autodiff sums their gradients back).
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  R = q_BxTxHxK.shape[2] // k_BxSxGxK.shape[2]
  if R > 1:
    k_BxSxGxK = jnp.repeat(k_BxSxGxK, R, axis=2)
    v_BxSxGxK = jnp.repeat(v_BxSxGxK, R, axis=2)
  seqlen, offsets, _ = cudnn_segments(mask.segment_ids_BxT, max_segments)
  kind = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  return cudnn.dot_product_attention(
      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, bias=None, mask=None, q_seqlen=seqlen,
      kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
      scale=q_BxTxHxK.shape[-1] ** -0.5, mask_type=kind,
      sliding_window_length=window or None)


def splash_static_ok(q, k, causal: bool, window: int, interpret: bool,
                     platform: str | None = None) -> bool:
  """`platform`: what the program is traced for (default: this backend)."""
  del causal, window
  T, S = q.shape[1], k.shape[1]
  if T != S or T % 128:
    return False
  if interpret:
    return True
  return (platform or jax.default_backend()) == 'tpu' and q.shape[-1] % 128 == 0


def splash_mask_ok(mask) -> jax.Array:
  """Splash expresses packed segments; it cannot express blocks or layouts."""
  T = mask.index_BxT.shape[1]
  return (jnp.all(mask.block_ids_BxT == 0) &
          jnp.all(mask.index_BxT == jnp.arange(T, dtype=mask.index_BxT.dtype)))


def splash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, causal: bool, window: int,
                     interpret: bool = False) -> jax.Array:
  """Pallas splash attention (TPU) with segment ids and a causal/local mask.

  GQA runs splash's multi-query kernel once per KV head (vmap over groups and
  batch). `interpret=True` runs the Pallas kernel in the interpreter (any
  backend; slow, for tests).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxSxGxK.shape[2]
  R = H // G
  if causal:
    m = sm.LocalMask((T, T), (window - 1, 0), 0) if window else sm.CausalMask((T, T))
  else:
    m = sm.LocalMask((T, T), (window - 1, None), 0) if window else sm.FullMask((T, T))
  blocks = sk.BlockSizes.get_default()
  blocks = sk.BlockSizes(**{f: min(getattr(blocks, f), T)
                            for f in ('block_q', 'block_kv', 'block_kv_compute',
                                      'block_q_dkv', 'block_kv_dkv', 'block_kv_dkv_compute',
                                      'block_q_dq', 'block_kv_dq')})
  kernel = sk.make_splash_mqa(sm.MultiHeadMask([m] * R), block_sizes=blocks,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  scale = K ** -0.5
  q_BxGxRxTxK = (q_BxTxHxK * scale).reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4)
  k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
  v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)
  seg = mask.segment_ids_BxT

  def one(q_RxTxK, k_SxK, v_SxK, seg_T):
    return kernel(q_RxTxK, k_SxK, v_SxK, segment_ids=sk.SegmentIds(seg_T, seg_T))

  per_group = jax.vmap(one, in_axes=(0, 0, 0, None))
  o = jax.vmap(per_group)(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK, seg)
  return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
