"""Blockwise (flash) attention: online softmax over query and key chunks.

Computes exactly what `dense.dense_attention` computes (same mask rule, GQA,
float32 softmax statistics) without ever materialising the [T, S] score
matrix: queries are cut into chunks of `block_q`, keys/values into chunks of
`block_k`, and each query chunk folds the key chunks in one at a time with the
online softmax of Milakov & Gimelshein 2018, as in Rabe & Staats 2021
("Self-attention does not need O(n^2) memory") and FlashAttention (Dao et
al. 2022).

The backward pass is a `jax.custom_vjp` that saves only the output and the
row logsumexp and recomputes the probabilities chunk by chunk
(FlashAttention-2, Dao 2023, alg. 2): autodiff through the scans would store
every chunk's probabilities, i.e. the O(T * S) memory this kernel exists to
avoid. A (query chunk, key chunk) pair whose mask is all False is skipped
with `lax.cond`, so causal and sliding-window attention cost about half /
T * window of the dense work.

The chunk-level functions (`to_chunks`, `fwd_chunks`, `bwd_chunks`,
`init_stats`, `finalize`, `maybe_visible`, `out_delta`) work on "chunk-major"
arrays and are public: ring attention (`gemjax.parallel.ring_attention`)
calls them once per ring step on the visiting key/value shard.

Imports jax and `gemjax.kernels.mask`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp

from gemjax.kernels.mask import NEG_INF, visible_mask

DEFAULT_BLOCK = 512
# Padding ids for rows/columns added to reach a multiple of the chunk size:
# they differ from each other and from every real segment id (>= 0), so a
# padded query sees nothing and a padded key is seen by nobody.
_PAD_Q_SEGMENT, _PAD_KV_SEGMENT = -1, -2


# Test hook, read at trace time: when set, the forward pass calls it on the
# host once per (query chunk, key chunk) pair it computes (not per skipped
# one). Set only by `count_computed_chunks`; None in every real run.
_chunk_probe = None


@contextlib.contextmanager
def count_computed_chunks() -> Iterator[list[tuple[int, int]]]:
  """Records the chunk pairs the forward pass really computes, as (smallest
  query token index, smallest key token index) per pair, for functions traced
  (jitted afresh) inside the block: a host callback per pair, for tests of
  what the skipping does, never for training."""
  global _chunk_probe
  seen: list[tuple[int, int]] = []
  _chunk_probe = lambda q_lo, k_lo: seen.append((int(q_lo), int(k_lo)))
  try:
    yield seen
  finally:
    _chunk_probe = None


class MaskMeta(NamedTuple):
  """The per-token arrays the mask reads, chunk-major: each [n, B, b]."""
  segment_ids: jax.Array
  block_ids: jax.Array
  index: jax.Array


class Stats(NamedTuple):
  """Online-softmax state of every query row, chunk-major.

  acc: [nq, B, G, R, bq, K] float32, the unnormalised output sum(p v);
  m, l: [nq, B, G, R, bq] float32, the running max and sum(exp(s - m)).
  """
  acc: jax.Array
  m: jax.Array
  l: jax.Array


# ------------------------------------------------------------- chunk layout


def num_chunks(n: int, block: int) -> tuple[int, int]:
  """(number of chunks, chunk size): the chunk is `block`, or n if smaller."""
  b = max(1, min(block, n))
  return -(-n // b), b


def _pad_axis(x: jax.Array, axis: int, total: int, value) -> jax.Array:
  extra = total - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def q_to_chunks(q_BxTxHxK: jax.Array, num_kv_heads: int, block: int) -> jax.Array:
  """[B, T, H, K] -> [nq, B, G, R, bq, K] (zero padded to nq * bq rows)."""
  B, T, H, K = q_BxTxHxK.shape
  G = num_kv_heads
  n, b = num_chunks(T, block)
  q = _pad_axis(q_BxTxHxK, 1, n * b, 0)
  q = q.reshape(B, n, b, G, H // G, K)
  return q.transpose(1, 0, 3, 4, 2, 5)


def q_from_chunks(o_NxBxGxRxbxK: jax.Array, T: int) -> jax.Array:
  """Inverse of `q_to_chunks`, dropping padded rows: -> [B, T, H, K]."""
  n, B, G, R, b, K = o_NxBxGxRxbxK.shape
  o = o_NxBxGxRxbxK.transpose(1, 0, 4, 2, 3, 5).reshape(B, n * b, G * R, K)
  return o[:, :T]


def kv_to_chunks(k_BxSxGxK: jax.Array, block: int) -> jax.Array:
  """[B, S, G, K] -> [nk, B, G, bk, K] (zero padded to nk * bk rows)."""
  B, S, G, K = k_BxSxGxK.shape
  n, b = num_chunks(S, block)
  k = _pad_axis(k_BxSxGxK, 1, n * b, 0)
  return k.reshape(B, n, b, G, K).transpose(1, 0, 3, 2, 4)


def meta_to_chunks(segment_ids_BxT, block_ids_BxT, index_BxT, block: int, *,
                   pad_segment: int) -> MaskMeta:
  """Mask inputs [B, T] -> chunk-major [n, B, b]; padding gets `pad_segment`."""
  T = segment_ids_BxT.shape[1]
  n, b = num_chunks(T, block)

  def chunk(x, value):
    x = _pad_axis(x.astype(jnp.int32), 1, n * b, value)
    return x.reshape(x.shape[0], n, b).transpose(1, 0, 2)

  return MaskMeta(chunk(segment_ids_BxT, pad_segment), chunk(block_ids_BxT, 0),
                  chunk(index_BxT, 0))


def zeros_varying(shape, dtype, like: jax.Array) -> jax.Array:
  """Zeros that vary over the same mesh axes as `like` (a no-op outside shard_map).

  `jax.shard_map` types every value with the mesh axes it varies over; a scan
  carry made with `jnp.zeros` inside the map is device-invariant and must be
  cast before it meets per-device values.
  """
  z = jnp.zeros(shape, dtype)
  vma = tuple(sorted(varying_axes(like)))
  return jax.lax.pcast(z, vma, to='varying') if vma else z


def varying_axes(x: jax.Array) -> frozenset:
  """The mesh axes `x` varies over inside shard_map (empty outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'mat', None)          # jax 0.10: aval.mat.varying
  if mat is not None and hasattr(mat, 'varying'):
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', ()) or ())   # older/newer spelling


def init_stats(q_chunks: jax.Array) -> Stats:
  shape = q_chunks.shape
  return Stats(zeros_varying(shape, jnp.float32, q_chunks),
               zeros_varying(shape[:-1], jnp.float32, q_chunks) + NEG_INF,
               zeros_varying(shape[:-1], jnp.float32, q_chunks))


def finalize(stats: Stats, dtype) -> tuple[jax.Array, jax.Array]:
  """(out, logsumexp). Rows that saw nothing (only padding rows) give 0."""
  seen = stats.l > 0
  l = jnp.where(seen, stats.l, 1.0)
  out = (stats.acc / l[..., None]).astype(dtype)
  lse = jnp.where(seen, stats.m + jnp.log(l), 0.0)
  return out, lse


def maybe_visible(q_meta: MaskMeta, kv_meta: MaskMeta, *, causal: bool,
                  window: int) -> jax.Array:
  """A cheap, conservative test: False only if no (query, key) pair is visible.

  Works on per-row ranges (min/max over all chunks), O(T + S) instead of the
  O(T * S) exact mask: ring attention asks it once per ring step.
  """
  def rng(x):
    return x.min(axis=(0, 2)), x.max(axis=(0, 2))

  q_seg_lo, q_seg_hi = rng(q_meta.segment_ids)
  kv_seg_lo, kv_seg_hi = rng(kv_meta.segment_ids)
  ok = jnp.maximum(q_seg_lo, kv_seg_lo) <= jnp.minimum(q_seg_hi, kv_seg_hi)
  # A shared bidirectional block overrides causality and the window.
  blocks = (q_meta.block_ids.max(axis=(0, 2)) > 0) & (kv_meta.block_ids.max(axis=(0, 2)) > 0)
  q_lo, q_hi = rng(q_meta.index)
  kv_lo, kv_hi = rng(kv_meta.index)
  if causal:
    ok = ok & ((kv_lo <= q_hi) | blocks)
  if window:
    ok = ok & ((q_lo - kv_hi < window) | blocks)
  return jnp.any(ok)


def _chunk_mask(qm, kvm, *, causal, window):
  """Exact [B, bq, bk] mask of one (query chunk, key chunk) pair."""
  return visible_mask(qm[0], kvm[0], qm[1], kvm[1], qm[2], kvm[2],
                      causal=causal, window=window)


def _tie(q_c, q_meta, kv_meta):
  """Makes the mask inputs look as data-dependent as q to JAX's partial eval.

  Inside a scan over layers the mask arrays are loop-invariant constants, and
  scan's partial evaluation hoists everything that depends only on constants
  out of the loop, *stacking* it over the chunk loops: every chunk's mask and
  masked-score fill, O(T * S) memory, exactly what this kernel avoids. An
  optimization barrier over (q, masks) makes the masks depend on the carry,
  so they are recomputed per chunk instead.
  """
  return jax.lax.optimization_barrier((q_c, q_meta, kv_meta))


# ---------------------------------------------------------------- forward


def capped(s: jax.Array, softcap: float) -> jax.Array:
  """Gemma 2's score soft-cap, softcap * tanh(s / softcap); 0 = off."""
  return softcap * jnp.tanh(s / softcap) if softcap else s


def fwd_chunks(q_c, q_meta: MaskMeta, k_c, v_c, kv_meta: MaskMeta, stats: Stats, *,
               causal: bool, window: int, scale: float, softcap: float = 0.0) -> Stats:
  """Folds every key/value chunk into the online softmax of every query chunk.

  q_c [nq, B, G, R, bq, K]; k_c, v_c [nk, B, G, bk, K]; metas chunk-major.
  """
  q_c, q_meta, kv_meta = _tie(q_c, q_meta, kv_meta)

  def per_q_chunk(_, xs):
    q, qm, acc, m, l = xs

    def per_kv_chunk(carry, ys):
      k, v, kvm = ys
      mask_BxQxS = _chunk_mask(qm, kvm, causal=causal, window=window)

      def compute(carry):
        acc, m, l = carry
        if _chunk_probe is not None:
          jax.debug.callback(_chunk_probe, qm.index.min(), kvm.index.min())
        s = capped(jnp.einsum('bgrqk,bgsk->bgrqs', q, k,
                              preferred_element_type=jnp.float32) * scale, softcap)
        mask = mask_BxQxS[:, None, None]
        s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # The explicit where: a row fully masked so far has m_new = NEG_INF and
        # exp(s - m_new) = 1 on its masked entries.
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l_new = l * corr + p.sum(axis=-1)
        pv = jnp.einsum('bgrqs,bgsk->bgrqk', p.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)
        return acc * corr[..., None] + pv, m_new, l_new

      return jax.lax.cond(jnp.any(mask_BxQxS), compute, lambda c: c, carry), None

    (acc, m, l), _ = jax.lax.scan(per_kv_chunk, (acc, m, l), (k_c, v_c, kv_meta))
    return None, (acc, m, l)

  _, (acc, m, l) = jax.lax.scan(per_q_chunk, None, (q_c, q_meta, *stats))
  return Stats(acc, m, l)


# --------------------------------------------------------------- backward


def bwd_chunks(q_c, q_meta: MaskMeta, k_c, v_c, kv_meta: MaskMeta, do_c, lse_c,
               delta_c, dq_c, *, causal: bool, window: int, scale: float,
               softcap: float = 0.0):
  """Gradient contributions of one key/value set (FlashAttention-2 backward).

  Recomputes p = exp(s - lse) chunk by chunk. Returns (dq_c + its share,
  dk_c, dv_c), all float32; dq_c [nq, ...] is the running query gradient.
  """
  q_c, q_meta, kv_meta = _tie(q_c, q_meta, kv_meta)

  def per_kv_chunk(dq_all, xs):
    k, v, kvm = xs

    def per_q_chunk(carry, ys):
      q, qm, do, lse, delta, dq = ys
      mask_BxQxS = _chunk_mask(qm, kvm, causal=causal, window=window)

      def compute(args):
        dk, dv, dq = args
        s = jnp.einsum('bgrqk,bgsk->bgrqs', q, k,
                       preferred_element_type=jnp.float32) * scale
        if softcap:
          t = jnp.tanh(s / softcap)
          s = softcap * t
        p = jnp.where(mask_BxQxS[:, None, None], jnp.exp(s - lse[..., None]), 0.0)
        dv = dv + jnp.einsum('bgrqs,bgrqk->bgsk', p.astype(do.dtype), do,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum('bgrqk,bgsk->bgrqs', do, v, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        if softcap:
          ds = ds * (1.0 - t * t)   # d(softcap tanh(s / softcap)) / ds
        ds = ds.astype(q.dtype)
        dq = dq + scale * jnp.einsum('bgrqs,bgsk->bgrqk', ds, k,
                                     preferred_element_type=jnp.float32)
        dk = dk + scale * jnp.einsum('bgrqs,bgrqk->bgsk', ds, q,
                                     preferred_element_type=jnp.float32)
        return dk, dv, dq

      dk, dv, dq = jax.lax.cond(jnp.any(mask_BxQxS), compute, lambda a: a, (*carry, dq))
      return (dk, dv), dq

    dk0 = zeros_varying(k.shape, jnp.float32, k)
    dv0 = zeros_varying(v.shape, jnp.float32, v)
    (dk, dv), dq_all = jax.lax.scan(
        per_q_chunk, (dk0, dv0), (q_c, q_meta, do_c, lse_c, delta_c, dq_all))
    return dq_all, (dk, dv)

  dq_c, (dk_c, dv_c) = jax.lax.scan(per_kv_chunk, dq_c, (k_c, v_c, kv_meta))
  return dq_c, dk_c, dv_c


def out_delta(o_c: jax.Array, do_c: jax.Array) -> jax.Array:
  """rowsum(dO * O), the softmax-Jacobian term of the backward (FA-2 eq. 4)."""
  return jnp.sum(do_c.astype(jnp.float32) * o_c.astype(jnp.float32), axis=-1)


# --------------------------------------------------------- whole kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def blockwise_core(q_c, k_c, v_c, q_meta, kv_meta, causal, window, scale, softcap=0.0):
  """Chunk-major blockwise attention with the FlashAttention-2 backward."""
  out, _ = _blockwise_fwd(q_c, k_c, v_c, q_meta, kv_meta, causal, window, scale, softcap)
  return out


def _blockwise_fwd(q_c, k_c, v_c, q_meta, kv_meta, causal, window, scale, softcap=0.0):
  stats = fwd_chunks(q_c, q_meta, k_c, v_c, kv_meta, init_stats(q_c),
                     causal=causal, window=window, scale=scale, softcap=softcap)
  out, lse = finalize(stats, q_c.dtype)
  return out, (q_c, k_c, v_c, q_meta, kv_meta, out, lse)


def _blockwise_bwd(causal, window, scale, softcap, res, do_c):
  q_c, k_c, v_c, q_meta, kv_meta, out, lse = res
  dq0 = zeros_varying(q_c.shape, jnp.float32, q_c)
  dq, dk, dv = bwd_chunks(q_c, q_meta, k_c, v_c, kv_meta, do_c, lse,
                          out_delta(out, do_c), dq0,
                          causal=causal, window=window, scale=scale, softcap=softcap)
  return (dq.astype(q_c.dtype), dk.astype(k_c.dtype), dv.astype(v_c.dtype), None, None)


blockwise_core.defvjp(_blockwise_fwd, _blockwise_bwd)


def to_chunks(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, kv_mask, *, block_q: int,
              block_k: int):
  """Everything `blockwise_core` / `fwd_chunks` take, chunk-major.

  Returns (q_c, k_c, v_c, q_meta, kv_meta); padded query rows and key
  columns get segment ids that match nothing.
  """
  G = k_BxSxGxK.shape[2]
  q_c = q_to_chunks(q_BxTxHxK, G, block_q)
  k_c, v_c = kv_to_chunks(k_BxSxGxK, block_k), kv_to_chunks(v_BxSxGxK, block_k)
  q_meta = meta_to_chunks(mask.segment_ids_BxT, mask.block_ids_BxT, mask.index_BxT,
                          block_q, pad_segment=_PAD_Q_SEGMENT)
  kv_meta = meta_to_chunks(kv_mask.segment_ids_BxT, kv_mask.block_ids_BxT,
                           kv_mask.index_BxT, block_k, pad_segment=_PAD_KV_SEGMENT)
  return q_c, k_c, v_c, q_meta, kv_meta


def blockwise_attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                        mask, *, kv_mask=None, causal: bool = True, window: int = 0,
                        block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
                        softcap: float = 0.0) -> jax.Array:
  """Dense attention's result in O(T * block) memory, on the local arrays.

  `mask` holds the queries' mask arrays, `kv_mask` the keys' (default: the
  same tokens). T and S need not be multiples of the blocks (padded).
  """
  kv_mask = mask if kv_mask is None else kv_mask
  T, K = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
  q_c, k_c, v_c, q_meta, kv_meta = to_chunks(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, kv_mask,
                                             block_q=block_q, block_k=block_k)
  o_c = blockwise_core(q_c, k_c, v_c, q_meta, kv_meta, causal, window, K ** -0.5, softcap)
  return q_from_chunks(o_c, T)
