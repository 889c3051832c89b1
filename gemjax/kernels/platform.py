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


def one_document_in_order(mask) -> jax.Array:
  """Run-time test that the mask is plain causal/window over one document.

  True when every row is a single segment (no padding, no packing), has no
  bidirectional block and is in its original order: what cuDNN's and
  splash's built-in causal/local masks express.
  """
  seg = mask.segment_ids_BxT
  T = seg.shape[1]
  one_doc = jnp.all(seg == seg[:, :1])
  no_blocks = jnp.all(mask.block_ids_BxT == 0)
  in_order = jnp.all(mask.index_BxT == jnp.arange(T, dtype=mask.index_BxT.dtype))
  return one_doc & no_blocks & in_order


def cudnn_static_ok(q, k, causal: bool, window: int) -> bool:
  if jax.default_backend() != 'gpu':
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return False
  K = q.shape[-1]
  if K % 8 or K > 256:
    return False
  # cuDNN has only a left window, and only together with the causal mask.
  return causal or not window


def cudnn_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, causal: bool,
                    window: int) -> jax.Array:
  """cuDNN fused attention (`jax.nn.dot_product_attention`), causal or local mask."""
  return jax.nn.dot_product_attention(
      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, is_causal=causal, implementation='cudnn',
      local_window_size=(window - 1, 0) if window else None)


def splash_static_ok(q, k, causal: bool, window: int, interpret: bool) -> bool:
  del causal, window
  T, S = q.shape[1], k.shape[1]
  if T != S or T % 128:
    return False
  if interpret:
    return True
  return jax.default_backend() == 'tpu' and q.shape[-1] % 128 == 0


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
