"""Grouped-query self-attention with QK-norm and multimodal RoPE.

The projections live in `Attention`; the score/softmax/value part is a
*kernel* looked up by name in `ATTENTION_KERNELS`, so memory-efficient,
ring and platform kernels plug in without touching the module. Every kernel
takes the same inputs and implements the same mask:

    visible(i, j) = same segment
                    AND (index_j <= index_i  OR  same nonzero block)   [causal]
                    AND (window == 0 OR index_i - index_j < window OR same block)

Padding (segment 0) only sees padding, so no row is empty and nothing leaks.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.model.layers import RMSNorm, SequenceInfo, apply_rope, fan_in_std, param, project
from gemjax.parallel.sharding import constrain

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionKernel(Protocol):

  def __call__(self, q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array,
               v_BxSxGxK: jax.Array, info: SequenceInfo, *, causal: bool,
               window: int) -> jax.Array:
    ...


ATTENTION_KERNELS: dict[str, AttentionKernel] = {}


def register_kernel(name: str) -> Callable[[AttentionKernel], AttentionKernel]:
  def deco(fn):
    ATTENTION_KERNELS[name] = fn
    return fn
  return deco


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


def _masked_scores(q_BxTxGxRxK, k_BxSxGxK, mask_BxTxS):
  """Scaled scores [B, G, R, T, S] in float32, NEG_INF where not visible."""
  q = q_BxTxGxRxK * jnp.asarray(q_BxTxGxRxK.shape[-1] ** -0.5, q_BxTxGxRxK.dtype)
  s = jnp.einsum('btgrk,bsgk->bgrts', q, k_BxSxGxK, preferred_element_type=jnp.float32)
  return jnp.where(mask_BxTxS[:, None, None], s, NEG_INF)


@jax.custom_vjp
def _softmax_attend(q_BxTxGxRxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS):
  return _softmax_attend_fwd(q_BxTxGxRxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS)[0]


def _softmax_attend_fwd(q, k, v, mask):
  s = _masked_scores(q, k, mask)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  denom_BxGxRxT = jnp.sum(e, axis=-1)
  # Normalise the [T, K] output rather than the [T, S] weights.
  out = jnp.einsum('bgrts,bsgk->btgrk', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = (out / jnp.moveaxis(denom_BxGxRxT, 3, 1)[..., None]).astype(v.dtype)
  lse = m + jnp.log(denom_BxGxRxT)[..., None]               # [B, G, R, T, 1]
  return out, (q, k, v, mask, out, lse)


def _softmax_attend_bwd(res, g_BxTxGxRxK):
  # The score matrix is recomputed rather than stored, and the softmax
  # backward's row sum uses sum_s(P * dP) = sum_k(dO * O) (FlashAttention,
  # Dao et al. 2022): a reduction over the head dim instead of over keys.
  q, k, v, mask, out, lse = res
  scale = q.shape[-1] ** -0.5
  probs = jnp.exp(_masked_scores(q, k, mask) - lse)        # masked -> exactly 0
  g = g_BxTxGxRxK
  dv = jnp.einsum('bgrts,btgrk->bsgk', probs.astype(g.dtype), g,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum('btgrk,bsgk->bgrts', g, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum('btgrk,btgrk->bgrt', g.astype(jnp.float32), out.astype(jnp.float32))
  ds = probs * (dp - delta[..., None])
  dq = jnp.einsum('bgrts,bsgk->btgrk', ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum('bgrts,btgrk->bsgk', ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return (dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype), None


_softmax_attend.defvjp(_softmax_attend_fwd, _softmax_attend_bwd)


def _split_groups(q_BxTxHxK, k_BxSxGxK):
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxSxGxK.shape[2]
  return q_BxTxHxK.reshape(B, T, G, H // G, K)


def _mask(info: SequenceInfo, causal: bool, window: int):
  return visible_mask(info.segment_ids_BxT, info.segment_ids_BxT,
                      info.block_ids_BxT, info.block_ids_BxT,
                      info.index_BxT, info.index_BxT, causal=causal, window=window)


@register_kernel('dense')
def dense_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, info: SequenceInfo, *,
                    causal: bool = True, window: int = 0) -> jax.Array:
  """The full [T, S] score matrix, softmax in float32.

  Same values as `naive_attention`; the backward pass recomputes the scores
  instead of keeping the [T, S] probabilities of every layer alive, which is
  less memory everywhere and about twice as fast on XLA:CPU.
  """
  q = _split_groups(q_BxTxHxK, k_BxSxGxK)
  out = _softmax_attend(q, k_BxSxGxK, v_BxSxGxK, _mask(info, causal, window))
  return out.reshape(q_BxTxHxK.shape)


def naive_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, info: SequenceInfo, *,
                    causal: bool = True, window: int = 0) -> jax.Array:
  """Textbook attention differentiated by JAX: the reference the kernels are tested against."""
  q = _split_groups(q_BxTxHxK, k_BxSxGxK)
  s = _masked_scores(q, k_BxSxGxK, _mask(info, causal, window))
  probs = jax.nn.softmax(s, axis=-1).astype(v_BxSxGxK.dtype)
  out = jnp.einsum('bgrts,bsgk->btgrk', probs, v_BxSxGxK)
  return out.reshape(q_BxTxHxK.shape)


class Attention(nnx.Module):
  """Pre-projected GQA: x -> q, k, v -> (QK-norm) -> RoPE -> kernel -> out."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               *, rope_base: float, mrope_sections, qk_norm: bool, kernel: str,
               window: int = 0, causal: bool = True, norm_eps: float = 1e-6,
               compute_dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kernel not in ATTENTION_KERNELS:
      raise ValueError(f'unknown attention kernel {kernel!r}; known: '
                       f'{sorted(ATTENTION_KERNELS)}')
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_base, self.mrope_sections = rope_base, tuple(mrope_sections)
    self.kernel, self.window, self.causal = kernel, window, causal
    self.compute_dtype = compute_dtype
    std = fan_in_std(d_model)
    self.wq_DxHxK = param(rngs, (d_model, num_heads, head_dim), ('embed', 'heads', 'head_dim'),
                          std=std, dtype=param_dtype)
    self.wk_DxGxK = param(rngs, (d_model, num_kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'),
                          std=std, dtype=param_dtype)
    self.wv_DxGxK = param(rngs, (d_model, num_kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'),
                          std=std, dtype=param_dtype)
    self.wo_HxKxD = param(rngs, (num_heads, head_dim, d_model), ('heads', 'head_dim', 'embed'),
                          std=fan_in_std(num_heads * head_dim), dtype=param_dtype)
    if qk_norm:
      self.q_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)
      self.k_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def project_qkv(self, x_BxTxD: jax.Array, info: SequenceInfo):
    cd = self.compute_dtype
    q = project(x_BxTxD, self.wq_DxHxK[...], dtype=cd)
    k = project(x_BxTxD, self.wk_DxGxK[...], dtype=cd)
    v = project(x_BxTxD, self.wv_DxGxK[...], dtype=cd)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, info.positions_BxTx3, base=self.rope_base, sections=self.mrope_sections)
    k = apply_rope(k, info.positions_BxTx3, base=self.rope_base, sections=self.mrope_sections)
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    k = constrain(k, ('batch', 'length', 'act_kv_heads', None))
    v = constrain(v, ('batch', 'length', 'act_kv_heads', None))
    return q, k, v

  def output(self, o_BxTxHxK: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    y = project(o_BxTxHxK, self.wo_HxKxD[...], 2, dtype=cd)
    return constrain(y, ('batch', 'length', 'act_embed'))

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo) -> jax.Array:
    q, k, v = self.project_qkv(x_BxTxD, info)
    o = ATTENTION_KERNELS[self.kernel](q, k, v, info, causal=self.causal, window=self.window)
    return self.output(o)
