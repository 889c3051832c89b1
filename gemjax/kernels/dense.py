"""Attention with the full [T, S] score matrix, softmax in float32.

`dense_attention` has a custom VJP that recomputes the scores in the backward
pass instead of keeping every layer's [T, S] probabilities alive (less memory
everywhere, about twice as fast on XLA:CPU); `naive_attention` is the
textbook version differentiated by JAX, the reference every other kernel is
tested against. GQA: q [B, T, H, K], k/v [B, S, G, K] with H a multiple of G.
Imports jax and `gemjax.kernels.mask`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemjax.kernels.mask import NEG_INF, full_mask


def split_groups(q_BxTxHxK: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, H, K] -> [B, T, G, R, K]: the R query heads that share a KV head."""
  B, T, H, K = q_BxTxHxK.shape
  return q_BxTxHxK.reshape(B, T, num_kv_heads, H // num_kv_heads, K)


def _raw_scores(q_BxTxGxRxK, k_BxSxGxK):
  q = q_BxTxGxRxK * jnp.asarray(q_BxTxGxRxK.shape[-1] ** -0.5, q_BxTxGxRxK.dtype)
  return jnp.einsum('btgrk,bsgk->bgrts', q, k_BxSxGxK, preferred_element_type=jnp.float32)


def _masked_scores(q_BxTxGxRxK, k_BxSxGxK, mask_BxTxS, softcap: float = 0.0):
  """Scaled (and soft-capped) scores [B, G, R, T, S] in float32, NEG_INF where
  not visible."""
  s = _raw_scores(q_BxTxGxRxK, k_BxSxGxK)
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  return jnp.where(mask_BxTxS[:, None, None], s, NEG_INF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attend(q_BxTxGxRxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, softcap=0.0):
  return _softmax_attend_fwd(q_BxTxGxRxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, softcap)[0]


def _softmax_attend_fwd(q, k, v, mask, softcap=0.0):
  s = _masked_scores(q, k, mask, softcap)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  denom_BxGxRxT = jnp.sum(e, axis=-1)
  # Normalise the [T, K] output rather than the [T, S] weights.
  out = jnp.einsum('bgrts,bsgk->btgrk', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = (out / jnp.moveaxis(denom_BxGxRxT, 3, 1)[..., None]).astype(v.dtype)
  lse = m + jnp.log(denom_BxGxRxT)[..., None]               # [B, G, R, T, 1]
  return out, (q, k, v, mask, out, lse)


def _softmax_attend_bwd(softcap, res, g_BxTxGxRxK):
  # The score matrix is recomputed rather than stored, and the softmax
  # backward's row sum uses sum_s(P * dP) = sum_k(dO * O) (FlashAttention,
  # Dao et al. 2022): a reduction over the head dim instead of over keys.
  q, k, v, mask, out, lse = res
  scale = q.shape[-1] ** -0.5
  probs = jnp.exp(_masked_scores(q, k, mask, softcap) - lse)   # masked -> exactly 0
  g = g_BxTxGxRxK
  dv = jnp.einsum('bgrts,btgrk->bsgk', probs.astype(g.dtype), g,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum('btgrk,bsgk->bgrts', g, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum('btgrk,btgrk->bgrt', g.astype(jnp.float32), out.astype(jnp.float32))
  ds = probs * (dp - delta[..., None])
  if softcap:   # d(softcap tanh(s / softcap)) / ds
    ds = ds * (1.0 - jnp.square(jnp.tanh(_raw_scores(q, k) / softcap)))
  dq = jnp.einsum('bgrts,bsgk->btgrk', ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum('bgrts,btgrk->bsgk', ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return (dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype), None


_softmax_attend.defvjp(_softmax_attend_fwd, _softmax_attend_bwd)


def dense_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None,
                    causal: bool = True, window: int = 0, softcap: float = 0.0) -> jax.Array:
  """Masked GQA attention over the full score matrix.

  `mask` holds the queries' mask arrays (a `MaskInfo` or anything with its
  fields); `kv_mask` the keys' (default: the same tokens, self-attention).
  """
  kv_mask = mask if kv_mask is None else kv_mask
  q = split_groups(q_BxTxHxK, k_BxSxGxK.shape[2])
  out = _softmax_attend(q, k_BxSxGxK, v_BxSxGxK,
                        full_mask(mask, kv_mask, causal=causal, window=window), softcap)
  return out.reshape(q_BxTxHxK.shape)


def naive_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None,
                    causal: bool = True, window: int = 0, softcap: float = 0.0) -> jax.Array:
  """Textbook attention differentiated by JAX: the reference kernels are tested against."""
  kv_mask = mask if kv_mask is None else kv_mask
  q = split_groups(q_BxTxHxK, k_BxSxGxK.shape[2])
  s = _masked_scores(q, k_BxSxGxK, full_mask(mask, kv_mask, causal=causal, window=window),
                     softcap)
  probs = jax.nn.softmax(s, axis=-1).astype(v_BxSxGxK.dtype)
  out = jnp.einsum('bgrts,bsgk->btgrk', probs, v_BxSxGxK)
  return out.reshape(q_BxTxHxK.shape)
