"""Key/value caches for decoding: the math of writing to one and attending to it.

A cache holds, per row, `S` slots of keys and values and the token index each
slot holds (-1: empty):

    k_BxSxGxK, v_BxSxGxK   rotated keys and values, as the layer computed them
    index_BxS              the token index (its place in the row) in each slot

Token i goes to slot i mod S. With S >= the row's length that is slot i (a
plain cache); with S = window it is a rolling buffer: the newest `window`
tokens, exactly what a sliding-window layer can still see. A write keeps only
the newest S valid tokens of each row, so a long prompt fills a rolling
buffer correctly in one call.

Attending with a new query at token index i: slot s is visible iff

    index[s] >= 0  and  index[s] <= i  and  (window == 0 or i - index[s] < window)

Decoding adds text-like tokens (block id 0, causal), one document per row, so
this is `gemjax.kernels.mask` for that case. The stats form (unnormalised
output, running max, sum) lets a cache split over devices be merged exactly
(`merge_stats`; the online softmax of Milakov & Gimelshein 2018). Every
function works on the local arrays it is given; `slot_offset` and
`total_slots` say which part of a longer cache they are. Imports jax only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gemjax.kernels.mask import NEG_INF


class KVCache(NamedTuple):
  """One attention layer's cache (see the module docstring)."""
  k_BxSxGxK: jax.Array
  v_BxSxGxK: jax.Array
  index_BxS: jax.Array


def init_cache(batch: int, slots: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
  """An empty cache: zeros, every slot index -1."""
  shape = (batch, slots, num_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.full((batch, slots), -1, jnp.int32))


def write_slots(index_BxT: jax.Array, valid_BxT: jax.Array, *, total_slots: int,
                slot_offset: int | jax.Array = 0, local_slots: int | None = None) -> jax.Array:
  """The local slot each token goes to, `local_slots` (= dropped) where it does not.

  Kept: valid tokens among the newest `total_slots` of the row (older ones
  would be overwritten in a rolling buffer anyway), whose slot
  index mod total_slots falls in [slot_offset, slot_offset + local_slots).
  """
  local = total_slots if local_slots is None else local_slots
  newest_B = jnp.max(jnp.where(valid_BxT, index_BxT, -1), axis=1)
  keep = valid_BxT & (index_BxT > newest_B[:, None] - total_slots) & (index_BxT >= 0)
  slot = jnp.mod(index_BxT, total_slots) - slot_offset
  keep = keep & (slot >= 0) & (slot < local)
  return jnp.where(keep, slot, local).astype(jnp.int32)


def write(cache: KVCache, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array, index_BxT: jax.Array,
          valid_BxT: jax.Array, *, total_slots: int | None = None,
          slot_offset: int | jax.Array = 0) -> KVCache:
  """Writes new keys/values at their slots (see `write_slots`)."""
  S = cache.index_BxS.shape[1]
  slot_BxT = write_slots(index_BxT, valid_BxT, total_slots=total_slots or S,
                         slot_offset=slot_offset, local_slots=S)

  def put(c, x):
    return jax.vmap(lambda c_, i_, x_: c_.at[i_].set(x_.astype(c_.dtype), mode='drop'))(
        c, slot_BxT, x)

  return KVCache(put(cache.k_BxSxGxK, k_BxTxGxK), put(cache.v_BxSxGxK, v_BxTxGxK),
                 put(cache.index_BxS, index_BxT.astype(jnp.int32)))


def visible(q_index_BxT: jax.Array, kv_index_BxS: jax.Array, *, window: int) -> jax.Array:
  """[B, T, S]: which slots each query sees (module docstring)."""
  kv = kv_index_BxS[:, None, :]
  delta = q_index_BxT[:, :, None] - kv
  ok = (kv >= 0) & (delta >= 0)
  if window:
    ok = ok & (delta < window)
  return ok


class Stats(NamedTuple):
  """Partial softmax attention over some slots: out = o / l after merging."""
  o_BxTxHxK: jax.Array     # sum_s exp(score - m) v_s, float32
  m_BxTxH: jax.Array       # max visible score (NEG_INF if none)
  l_BxTxH: jax.Array       # sum_s exp(score - m)


def attend_stats(q_BxTxHxK: jax.Array, cache: KVCache, q_index_BxT: jax.Array, *,
                 window: int = 0) -> Stats:
  """Softmax statistics of the queries over this cache's visible slots."""
  B, T, H, K = q_BxTxHxK.shape
  G = cache.k_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(B, T, G, H // G, K)
  q = q * jnp.asarray(K ** -0.5, q.dtype)
  s = jnp.einsum('btgrk,bsgk->btgrs', q, cache.k_BxSxGxK, preferred_element_type=jnp.float32)
  ok = visible(q_index_BxT, cache.index_BxS, window=window)[:, :, None, None, :]
  s = jnp.where(ok, s, NEG_INF)
  m = jnp.max(s, axis=-1)
  # Zero, not exp(0), where masked: a slice with no visible slot adds nothing.
  e = jnp.where(ok, jnp.exp(s - m[..., None]), 0.0)
  l = jnp.sum(e, axis=-1)
  o = jnp.einsum('btgrs,bsgk->btgrk', e.astype(cache.v_BxSxGxK.dtype), cache.v_BxSxGxK,
                 preferred_element_type=jnp.float32)
  return Stats(o.reshape(B, T, H, K), m.reshape(B, T, H), l.reshape(B, T, H))


def rescale(stats: Stats, m_global_BxTxH: jax.Array) -> Stats:
  """The same statistics relative to a larger max (before summing partials)."""
  c = jnp.exp(stats.m_BxTxH - m_global_BxTxH)
  return Stats(stats.o_BxTxHxK * c[..., None], m_global_BxTxH, stats.l_BxTxH * c)


def finalize(stats: Stats, dtype) -> jax.Array:
  return (stats.o_BxTxHxK / jnp.maximum(stats.l_BxTxH, 1e-30)[..., None]).astype(dtype)


def attend(q_BxTxHxK: jax.Array, cache: KVCache, q_index_BxT: jax.Array, *,
           window: int = 0) -> jax.Array:
  """Attention of new queries over a (whole, local) cache: [B, T, H, K]."""
  return finalize(attend_stats(q_BxTxHxK, cache, q_index_BxT, window=window),
                  q_BxTxHxK.dtype)
