"""KV caches on a mesh: batch over the data-like axes, KV heads over 'tensor',
slots over 'context' (a cache is [B, G, S, K]: gemjax/kernels/cache.py).

A cache whose slots are split over the context axis is ring attention's
decode form: each device holds a contiguous range of slots, computes the
softmax statistics (out, max, sum) of the new queries over its range
(`gemjax.kernels.cache.attend_stats`), and the partials are merged across the
axis with one `pmax` and two `psum`s, the same online-softmax algebra the
ring folds its steps with. Writes go to the device that owns the slot.

Without a mesh (or on one device) both functions are the plain kernels.
Imports jax, `gemjax.kernels.cache` and `gemjax.parallel.sharding` / `axes`.
"""

from __future__ import annotations


import jax
from jax.sharding import PartitionSpec as P

from gemjax.kernels import cache as cache_lib
from gemjax.kernels.cache import KVCache
from gemjax.parallel.axes import CONTEXT_AXIS, axis_size
from gemjax.parallel.sharding import current_mesh, logical_to_spec

# Logical names of a cache's arrays (the same table as every activation).
CACHE_AXES = ('batch', 'act_kv_heads', 'length', None)
INDEX_AXES = ('batch', 'length')


def _specs(mesh, B: int, S: int, H: int, G: int):
  """(batch, slots, heads) entries of the map's PartitionSpecs."""
  sizes = dict(mesh.shape)
  spec = logical_to_spec(CACHE_AXES, mesh)
  batch, heads, seq = spec[0], spec[1], spec[2]
  if B % axis_size(sizes, batch):
    batch = None
  tp = axis_size(sizes, heads)
  if H % tp or G % tp:
    heads = None
  if seq is not None and (seq != CONTEXT_AXIS or S % axis_size(sizes, seq)):
    seq = None
  return batch, seq, heads


def cache_sharding_names(num_slots: int, mesh=None) -> tuple:
  """Logical names for a cache of `num_slots` slots (slots replicated if they
  do not split evenly over the context axis)."""
  mesh = mesh or current_mesh()
  if mesh is None:
    return CACHE_AXES
  n = dict(mesh.shape).get(CONTEXT_AXIS, 1)
  return CACHE_AXES if num_slots % n == 0 else ('batch', 'act_kv_heads', None, None)


def _mesh_or_none():
  mesh = current_mesh()
  return None if mesh is None or mesh.size == 1 else mesh


def write(cache: KVCache, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array, index_BxT: jax.Array,
          valid_BxT: jax.Array) -> KVCache:
  """`kernels.cache.write` with each device writing the slots it holds."""
  mesh = _mesh_or_none()
  if mesh is None:
    return cache_lib.write(cache, k_BxTxGxK, v_BxTxGxK, index_BxT, valid_BxT)
  B, G, S, _ = cache.k_BxGxSxK.shape
  batch, seq, heads = _specs(mesh, B, S, G, G)
  n = axis_size(dict(mesh.shape), seq)

  def body(c, k, v, idx, ok):
    offset = jax.lax.axis_index(seq) * (S // n) if seq else 0
    return cache_lib.write(c, k, v, idx, ok, total_slots=S, slot_offset=offset)

  c_spec = KVCache(P(batch, heads, seq, None), P(batch, heads, seq, None), P(batch, seq))
  new = P(batch, None, heads, None)
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(c_spec, new, new, P(batch, None), P(batch, None)),
                       out_specs=c_spec)(cache, k_BxTxGxK, v_BxTxGxK, index_BxT, valid_BxT)


def attend(q_BxTxHxK: jax.Array, cache: KVCache, q_index_BxT: jax.Array, *,
           window: int = 0, softcap: float = 0.0) -> jax.Array:
  """Attention of new queries over the cache, merged across the context axis."""
  mesh = _mesh_or_none()
  if mesh is None:
    return cache_lib.attend(q_BxTxHxK, cache, q_index_BxT, window=window, softcap=softcap)
  B, T, H, _ = q_BxTxHxK.shape
  _, G, S, _ = cache.k_BxGxSxK.shape
  batch, seq, heads = _specs(mesh, B, S, H, G)

  def body(q, c, qi):
    stats = cache_lib.attend_stats(q, c, qi, window=window, softcap=softcap)
    if seq:
      stats = cache_lib.rescale(stats, jax.lax.pmax(stats.m_BxTxH, seq))
      stats = cache_lib.Stats(jax.lax.psum(stats.o_BxTxHxK, seq), stats.m_BxTxH,
                              jax.lax.psum(stats.l_BxTxH, seq))
    return cache_lib.finalize(stats, q.dtype)

  c_spec = KVCache(P(batch, heads, seq, None), P(batch, heads, seq, None), P(batch, seq))
  q_spec = P(batch, None, heads, None)
  return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, c_spec, P(batch, None)),
                       out_specs=q_spec)(q_BxTxHxK, cache, q_index_BxT)
