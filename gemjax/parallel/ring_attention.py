"""Ring attention: exact attention over a sequence split across the 'context' axis.

Liu, Zaharia & Abbeel 2023 ("Ring Attention with Blockwise Transformers").
Each of the N devices on the context axis holds T/N queries and the matching
keys/values. For N steps every device folds the key/value shard it currently
holds into the online softmax of its queries (`kernels.flash.fwd_chunks`, in
chunks of `block`) and hands that shard, with its segment ids, block ids and
original token indices, to the next device with `ppermute`. The permute of
step s+1 does not depend on the compute of step s, so XLA can overlap them.

The backward is a `jax.custom_vjp` (autodiff through the ring would store
every step's probabilities, O(T^2/N) per device): it saves only the output
and the logsumexp, recomputes each step's probabilities, keeps dQ on the
query's device and sends dK/dV around the ring *with* their K/V shard, so
after N hops they are back home (FlashAttention-2 backward per step).

Skipping: a ring step whose shard is certainly invisible (a conservative
range test on the mask arrays, `kernels.flash.maybe_visible`) is skipped with
`lax.cond`; inside a step every fully masked (query chunk, key chunk) pair is
skipped exactly. Under the causal mask a contiguous split leaves device 0
with 1 visible step and device N-1 with N; the zigzag and striped layouts of
`gemjax.parallel.layouts` balance that.

Batch dims are split over the data-like mesh axes and heads over 'tensor'
like every other activation (the same logical-axis table). This module knows
the mesh; the model only names the kernel ('ring'). `sharded_blockwise` is
the same map without the ring: each device runs the blockwise kernel on its
own batch/head shard, so it tests and skips its own chunks.

Imports jax, `gemjax.kernels.flash` (public names only) and
`gemjax.parallel.sharding` / `axes`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemjax.kernels import flash
from gemjax.kernels.mask import MaskInfo
from gemjax.parallel.axes import CONTEXT_AXIS, axis_size
from gemjax.parallel.sharding import current_mesh, logical_to_spec


# Chunks of at most half a device's shard under a ring (see _local_attention);
# a switch only so that bench/ring_layouts.py can measure the difference.
HALF_CHUNKS = True


def _ring_perm(n: int) -> list[tuple[int, int]]:
  return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ring_core(q_c, k_c, v_c, q_meta, kv_meta, axis_name, n, causal, window, scale,
               softcap=0.0):
  out, _ = _ring_fwd(q_c, k_c, v_c, q_meta, kv_meta, axis_name, n, causal, window, scale,
                     softcap)
  return out


def _ring_fwd(q_c, k_c, v_c, q_meta, kv_meta, axis_name, n, causal, window, scale,
              softcap=0.0):
  perm = _ring_perm(n)
  chunk = functools.partial(flash.fwd_chunks, causal=causal, window=window, scale=scale,
                            softcap=softcap)

  def step(carry, _):
    stats, (k, v, kvm) = carry
    nxt = jax.lax.ppermute((k, v, kvm), axis_name, perm)
    visible = flash.maybe_visible(q_meta, kvm, causal=causal, window=window)
    stats = jax.lax.cond(visible, lambda s: chunk(q_c, q_meta, k, v, kvm, s),
                         lambda s: s, stats)
    return (stats, nxt), None

  (stats, _), _ = jax.lax.scan(step, (flash.init_stats(q_c), (k_c, v_c, kv_meta)),
                               None, length=n)
  out, lse = flash.finalize(stats, q_c.dtype)
  return out, (q_c, k_c, v_c, q_meta, kv_meta, out, lse)


def _ring_bwd(axis_name, n, causal, window, scale, softcap, res, do_c):
  q_c, k_c, v_c, q_meta, kv_meta, out, lse = res
  perm = _ring_perm(n)
  delta = flash.out_delta(out, do_c)
  chunk = functools.partial(flash.bwd_chunks, causal=causal, window=window, scale=scale,
                            softcap=softcap)

  def step(carry, _):
    dq, (k, v, kvm), (dk, dv) = carry
    nxt = jax.lax.ppermute((k, v, kvm), axis_name, perm)

    def compute(args):
      dq, dk, dv = args
      dq, dk_s, dv_s = chunk(q_c, q_meta, k, v, kvm, do_c, lse, delta, dq)
      return dq, dk + dk_s, dv + dv_s

    visible = flash.maybe_visible(q_meta, kvm, causal=causal, window=window)
    dq, dk, dv = jax.lax.cond(visible, compute, lambda a: a, (dq, dk, dv))
    # dK/dV travel with their shard: after n hops they are home again.
    dk, dv = jax.lax.ppermute((dk, dv), axis_name, perm)
    return (dq, nxt, (dk, dv)), None

  zeros = lambda x: flash.zeros_varying(x.shape, jnp.float32, x)
  init = (zeros(q_c), (k_c, v_c, kv_meta), (zeros(k_c), zeros(v_c)))
  (dq, _, (dk, dv)), _ = jax.lax.scan(step, init, None, length=n)
  return (dq.astype(q_c.dtype), dk.astype(k_c.dtype), dv.astype(v_c.dtype), None, None)


_ring_core.defvjp(_ring_fwd, _ring_bwd)


def _local_attention(q, k, v, q_seg, q_blk, q_idx, kv_seg, kv_blk, kv_idx, *, axis_name, n,
                     causal, window, block, softcap=0.0):
  """Per-device body: chunk, run the ring (n > 1) or one local pass, unchunk."""
  T, K = q.shape[1], q.shape[-1]
  if n > 1 and HALF_CHUNKS:
    # Zigzag gives each device two half-shards from opposite ends of the row:
    # in one chunk they are never fully masked, so nothing would be skipped
    # (1.78x the causal work at 4K on 8 devices). Chunks no larger than a
    # half-shard are skipped exactly as in the contiguous layout.
    block = min(block, max(1, T // 2))
  q_c, k_c, v_c, q_meta, kv_meta = flash.to_chunks(
      q, k, v, MaskInfo(q_seg, q_blk, q_idx), MaskInfo(kv_seg, kv_blk, kv_idx),
      block_q=block, block_k=block)
  if n > 1:
    o_c = _ring_core(q_c, k_c, v_c, q_meta, kv_meta, axis_name, n, causal, window,
                     K ** -0.5, softcap)
  else:
    o_c = flash.blockwise_core(q_c, k_c, v_c, q_meta, kv_meta, causal, window, K ** -0.5,
                               softcap)
  return flash.q_from_chunks(o_c, T)


def _mapped(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, kv_mask, *, mesh, n, axis_name, causal,
            window, block, softcap=0.0):
  """Runs `_local_attention` under shard_map: batch, heads and (n > 1) sequence split."""
  B, T, H, _ = q_BxTxHxK.shape
  G = k_BxSxGxK.shape[2]
  sizes = dict(mesh.shape)
  q_spec = logical_to_spec(('batch', 'length', 'act_heads', None), mesh)
  kv_spec = logical_to_spec(('batch', 'length', 'act_kv_heads', None), mesh)
  batch = q_spec[0]
  if B % axis_size(sizes, batch):
    batch = None   # e.g. an eval batch smaller than the data axis: replicate
  heads, kv_heads = q_spec[2], kv_spec[2]
  tp = axis_size(sizes, heads)
  if heads != kv_heads or H % tp or G % tp:
    heads = kv_heads = None   # GQA groups would not stay together: replicate
  seq = axis_name if n > 1 else None
  if n > 1 and T % n:
    raise ValueError(f'ring attention: sequence length {T} is not divisible by the '
                     f"'{axis_name}' mesh axis of size {n}")
  body = functools.partial(_local_attention, axis_name=axis_name, n=n, causal=causal,
                           window=window, block=block, softcap=softcap)
  tok = P(batch, seq)
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(P(batch, seq, heads, None), P(batch, seq, kv_heads, None),
                               P(batch, seq, kv_heads, None)) + (tok,) * 6,
                     out_specs=P(batch, seq, heads, None))
  return fn(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask.segment_ids_BxT, mask.block_ids_BxT,
            mask.index_BxT, kv_mask.segment_ids_BxT, kv_mask.block_ids_BxT, kv_mask.index_BxT)


def sharded_blockwise(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                      mask, *, kv_mask=None, causal: bool = True, window: int = 0,
                      block: int = flash.DEFAULT_BLOCK, softcap: float = 0.0) -> jax.Array:
  """Blockwise attention, each device on its batch/head shard (no sequence split).

  Without a mesh (or on a 1-device one) this is `flash.blockwise_attention`.
  A sequence split over 'context' would be gathered here (every context
  shard computing the whole attention), so `gemjax.parallel.mesh.validate_mesh`
  rejects this kernel when mesh.context > 1: use `ring_attention`.
  """
  kv_mask = mask if kv_mask is None else kv_mask
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return flash.blockwise_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, kv_mask=kv_mask,
                                     causal=causal, window=window, block_q=block,
                                     block_k=block, softcap=softcap)
  return _mapped(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, kv_mask, mesh=mesh, n=1,
                 axis_name=CONTEXT_AXIS, causal=causal, window=window, block=block,
                 softcap=softcap)


def ring_attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                   mask, *, causal: bool = True, window: int = 0,
                   block: int = flash.DEFAULT_BLOCK,
                   axis_name: str = CONTEXT_AXIS, softcap: float = 0.0) -> jax.Array:
  """Self-attention with the sequence split over `axis_name` of the current mesh.

  Without a mesh (or a 1-device one) this is `flash.blockwise_attention`;
  with a context axis of size 1, `sharded_blockwise`. Requires T divisible by
  the context size (the config checks seq_len).
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return flash.blockwise_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, causal=causal,
                                     window=window, block_q=block, block_k=block,
                                     softcap=softcap)
  n = dict(mesh.shape).get(axis_name, 1)
  return _mapped(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, mask, mesh=mesh, n=n,
                 axis_name=axis_name, causal=causal, window=window, block=block,
                 softcap=softcap)
