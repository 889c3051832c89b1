"""Attention kernels against the dense reference: same mask, same numbers.

Every kernel is compared with `naive_attention` (the full score matrix,
differentiated by JAX) on
f32 inputs with packed segments, padding, bidirectional blocks and GQA, for
the output and the gradients of q, k, v (atol 1e-5). Masks are data, so one
compiled function per static (causal, window) covers every batch layout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemjax.kernels import flash, platform
from gemjax.kernels import dense_attention, naive_attention, visible_mask
from gemjax.model import attention as attn
from gemjax.model.info import SequenceInfo
from support import (ATOL, assert_same, cudnn_calls, dense_fn, make_inputs, pretend_cuda,
                     value_and_grads, window_probe)

ATTENTION_KERNELS = attn.KERNELS

MASKS = [(True, 0), (True, 9), (False, 0), (False, 9)]


@pytest.mark.parametrize('causal,window', MASKS)
def test_dense_kernel_custom_vjp_matches_autodiff(causal, window):
  """'dense' recomputes scores in its backward; values and grads are unchanged."""
  q, k, v, ct, info = make_inputs()
  assert_same(value_and_grads(dense_attention, causal, window)(q, k, v, ct, info),
              dense_fn(causal, window)(q, k, v, ct, info))


@pytest.mark.parametrize('causal,window', MASKS)
def test_blockwise_matches_dense_packed_blocks_gqa(causal, window):
  q, k, v, ct, info = make_inputs()
  # block_q=16 pads 72 -> 80 rows; block_k=8 divides: both paths exercised.
  kernel = functools.partial(flash.blockwise_attention, block_q=16, block_k=8)
  assert_same(value_and_grads(kernel, causal, window)(q, k, v, ct, info),
              dense_fn(causal, window)(q, k, v, ct, info))


def test_blockwise_matches_dense_permuted_order():
  """The mask reads token_index, not array order (what ring layouts rely on)."""
  q, k, v, ct, info = make_inputs()
  perm = np.random.default_rng(1).permutation(q.shape[1])
  p = lambda x: x[:, perm]
  pinfo = SequenceInfo(*[p(x) for x in info])
  kernel = functools.partial(flash.blockwise_attention, block_q=16, block_k=16)
  (_, o1), g1 = value_and_grads(kernel, True, 9)(p(q), p(k), p(v), p(ct), pinfo)
  (_, o0), g0 = dense_fn(True, 9)(q, k, v, ct, info)
  np.testing.assert_allclose(o1, p(o0), atol=ATOL)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, p(b), atol=ATOL)


@pytest.mark.parametrize('kernel', ['dense', 'blockwise'])
def test_sliding_window_exact_at_window_edge(kernel):
  T, W = 32, 5
  q, k, v, info = window_probe(T, W)
  fn = ATTENTION_KERNELS[kernel]
  if kernel == 'blockwise':
    fn = functools.partial(attn.blockwise_kernel, block=8)   # edges cross chunks
  out = np.asarray(fn(q, k, v, info, causal=True, window=W))[0, :, 0, :]
  for i in range(T):
    seen = np.nonzero(out[i] > 0)[0]
    # Exactly keys i-W+1 .. i: key i-W+1 is inside, key i-W is outside.
    np.testing.assert_array_equal(seen, np.arange(max(0, i - W + 1), i + 1))
    np.testing.assert_allclose(out[i, seen], 1.0 / len(seen), atol=1e-6)


def test_visible_mask_window_edge_and_block_override():
  T, W = 12, 3
  idx = jnp.arange(T)[None]
  seg = jnp.ones((1, T), jnp.int32)
  blk = jnp.zeros((1, T), jnp.int32).at[0, 2:9].set(4)
  m = np.asarray(visible_mask(seg, seg, blk, blk, idx, idx, causal=True, window=W))[0]
  assert m[10, 8] and not m[10, 7]              # delta 2 < 3 visible, delta 3 not
  assert m[8, 2] and m[2, 8]                    # a block sees itself both ways
  assert not m[9, 6]                            # outside the block: window again


@pytest.mark.parametrize('name', ['cudnn', 'splash'])
def test_platform_kernels_fall_back_to_blockwise_on_cpu(name):
  q, k, v, ct, info = make_inputs()
  kernel = functools.partial(ATTENTION_KERNELS[name], block=16)
  assert_same(value_and_grads(kernel, True, 9)(q, k, v, ct, info),
              dense_fn(True, 9)(q, k, v, ct, info))


def _cudnn_packed_reference(q, k, v, seqlen, offsets, *, causal, window):
  """What cuDNN's packed layout computes, written from its documented meaning
  (numpy, f32): every (offset, seqlen) pair is a sequence of its own, with the
  causal mask and the left window counted from that sequence's start."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, K = q.shape
  R = H // k.shape[2]
  out = np.full(q.shape, np.nan)
  for b in range(B):
    for n, start in zip(seqlen[b], offsets[b]):
      if n < 0:
        continue
      sl = slice(start, start + n)
      qs, ks, vs = q[b, sl], np.repeat(k[b, sl], R, 1), np.repeat(v[b, sl], R, 1)
      s = np.einsum('thk,shk->hts', qs, ks) * K ** -0.5
      i, j = np.arange(n)[:, None], np.arange(n)[None, :]
      ok = np.ones((n, n), bool)
      if causal:
        ok &= j <= i
      if window:
        ok &= i - j < window
      s = np.where(ok, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, sl] = np.einsum('hts,shk->thk', p / p.sum(-1, keepdims=True), vs)
  return out


def _cudnn_grad_hlo(monkeypatch, *, window, B=2, mesh=None):
  """The gradient of `cudnn_kernel` on packed GQA rows (4 query heads, 2 KV
  heads, bf16), lowered for CUDA from this CPU host: JAX's trace-time GPU
  probes are stubbed (`support.pretend_cuda`), they need a GPU."""
  from gemjax.parallel import sharding as shd
  pretend_cuda(monkeypatch)
  monkeypatch.setattr(platform, 'cudnn_static_ok', lambda *a: True)
  q, k, v, ct, info = make_inputs(B=B, T=64, K=16)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  def loss(q, k, v):
    o = attn.cudnn_kernel(q, k, v, info, causal=True, window=window)
    return jnp.sum(o.astype(jnp.float32) * ct)

  lower = lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
      lowering_platforms=('cuda',)).as_text()
  if mesh is None:
    return lower()
  with shd.use_mesh(mesh):
    return lower()


def test_cudnn_segments_are_the_runs_of_segment_ids():
  M = 4
  rows = np.array([[1, 1, 1, 2, 2, 0, 0, 0],     # packed + padding: 3 runs
                   [5, 5, 3, 3, 3, 3, 0, 0],     # ids need not increase
                   [1, 2, 3, 4, 4, 4, 4, 4]], np.int32)
  seqlen, offsets, ok = platform.cudnn_segments(jnp.asarray(rows), M)
  np.testing.assert_array_equal(seqlen, [[3, 2, 3, -1], [2, 4, 2, -1], [1, 1, 1, 5]])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, 2, 6, -1, -1],
                                          [0, 1, 2, 3, -1]])
  assert bool(ok)
  # Not expressible: an id in two runs (padding between documents twice,
  # or a document split), or more than M runs.
  for bad in ([1, 1, 0, 0, 2, 2, 0, 0], [1, 1, 2, 2, 1, 1, 0, 0], [1, 2, 3, 4, 5, 0, 0, 0]):
    assert not bool(platform.cudnn_segments(jnp.asarray([rows[0], bad]), M)[2]), bad
  assert bool(platform.cudnn_segments(jnp.asarray([[1, 0, 2, 2]]), M)[2])  # one padding run


@pytest.mark.parametrize('causal,window', [(True, 0), (True, 9), (False, 0)])
def test_cudnn_packed_layout_is_the_gemjax_mask(causal, window):
  """The seqlen/offsets given to cuDNN describe exactly gemjax's mask on
  packed and padded rows, padding included (it is a run of its own): the
  packed-layout semantics, computed in numpy, equal the dense reference."""
  q, k, v, ct, info = make_inputs()
  info = info._replace(block_ids_BxT=jnp.zeros_like(info.block_ids_BxT))
  assert bool(platform.cudnn_mask_ok(info))
  seqlen, offsets, _ = platform.cudnn_segments(info.segment_ids_BxT)
  np.testing.assert_array_equal(np.asarray(seqlen)[:, :5], [[30, 20, 16, 6, -1],
                                                           [41, 31, -1, -1, -1]])
  want = dense_fn(causal, window)(q, k, v, ct, info)[0][1]
  got = _cudnn_packed_reference(q, k, v, np.asarray(seqlen), np.asarray(offsets),
                                causal=causal, window=window)
  np.testing.assert_allclose(got, want, atol=ATOL)


def test_cudnn_kernel_runs_per_device_under_a_mesh_with_local_offsets(monkeypatch):
  """Under a data x tensor mesh (lowered for CUDA) cuDNN runs inside a
  shard_map: each device gets its own rows and heads, K/V repeated to its
  query heads, and the seqlen/offsets of its own rows (not the global
  batch's, which the cuDNN call would read as if they were local)."""
  from gemjax.parallel import sharding as shd
  mesh = shd.make_mesh({'data': 2, 'fsdp': 1, 'expert': 1, 'context': 1, 'tensor': 2},
                       devices=jax.devices()[:4])
  hlo = _cudnn_grad_hlo(monkeypatch, window=0, B=4, mesh=mesh)
  assert cudnn_calls(hlo) == {'__cudnn$fmhaSoftmax': 7, '__cudnn$fmhaSoftmaxBackward': 10}
  assert 'manual_computation' in hlo
  (line,) = [l for l in hlo.splitlines() if 'custom_call @__cudnn$fmhaSoftmax(' in l]
  operands = line[line.rindex(' : (') + 4:line.index(') ->', line.rindex(' : ('))]
  # 2 of 4 rows, 2 of 4 query heads, KV heads 1 of 2 repeated to 2; M = 16.
  assert operands.split(', ') == ['tensor<2x64x2x16xbf16>'] * 3 + ['tensor<2x16xi32>'] * 2 + [
      'tensor<2x17xi32>'] * 2, operands


def test_cudnn_mask_check_rejects_blocks_layouts_and_too_many_runs():
  _, _, _, _, info = make_inputs()
  no_blocks = info._replace(block_ids_BxT=jnp.zeros_like(info.block_ids_BxT))
  assert not bool(platform.cudnn_mask_ok(info))                # bidirectional blocks
  permuted = no_blocks._replace(index_BxT=no_blocks.index_BxT[:, ::-1])
  assert not bool(platform.cudnn_mask_ok(permuted))            # a context layout
  T = info.segment_ids_BxT.shape[1]
  many = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) // 4 + 1, (2, T))   # 18 runs
  assert not bool(platform.cudnn_mask_ok(no_blocks._replace(segment_ids_BxT=many)))


def test_cudnn_call_gets_kv_heads_repeated_so_jax_offsets_stay_inside_kv(monkeypatch):
  """JAX's cuDNN entry point turns token offsets into element offsets with
  the *query's* head count, for K and V too: grouped K/V heads must reach it
  repeated, or cuDNN reads (and its backward writes) past K/V. Checked with
  JAX's own conversion (`_fix_seqlen_offsets`) on what gemjax passes."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  seen = {}

  def record(q, k, v, **kw):
    seen.update(q=q, k=k, **kw)
    return jnp.zeros_like(q)

  monkeypatch.setattr(cudnn, 'dot_product_attention', record)
  q, k, v, _, info = make_inputs()                     # 4 query heads, 2 KV heads
  platform.cudnn_attention(q, k, v, info, causal=True, window=0)
  assert seen['k'].shape == q.shape
  np.testing.assert_array_equal(seen['k'][:, :, 1], k[:, :, 0])   # head 1 uses KV head 0
  _, _, q_off, kv_off = cudnn._fix_seqlen_offsets(
      seen['q_seqlen'], seen['kv_seqlen'], seen['q_offsets'], seen['kv_offsets'],
      seen['q'], seen['k'])
  # Segment starts, in elements (the fill past the last one is the array's end).
  starts = np.asarray(kv_off)[np.asarray(kv_off) < q.size]
  np.testing.assert_array_equal(starts, np.asarray(q_off)[np.asarray(q_off) < q.size])
  assert starts.max() < seen['k'].size
  assert starts.max() >= k.size                         # past un-repeated K/V's end


def test_cudnn_kernel_lowers_to_the_packed_cudnn_call_for_gpu(monkeypatch):
  """Lowered for CUDA from this CPU host (no GPU here): packed rows go to
  cuDNN's fused attention forward and backward with the seqlen/offsets
  operands, the padding-causal mask and the window; the batch-level
  'blockwise' fallback is the other branch. JAX's trace-time GPU probes
  are stubbed (`support.pretend_cuda`): they need a GPU."""
  hlo = _cudnn_grad_hlo(monkeypatch, window=9)
  calls = cudnn_calls(hlo)
  # q, k, v, q/kv seqlen, q/kv offsets (+ output, stats, grad in backward).
  assert calls == {'__cudnn$fmhaSoftmax': 7, '__cudnn$fmhaSoftmaxBackward': 10}, calls
  assert hlo.count('mask_type\\22: \\22PADDING_CAUSAL') == 2
  assert hlo.count('sliding_window_length\\22: 9') == 2
  assert 'stablehlo.case' in hlo


def test_blockwise_backward_keeps_only_linear_residuals():
  """The custom VJP saves q, k, v, out and logsumexp: no [T, S] probabilities."""
  q, k, v, ct, info = make_inputs(T=256, H=2, G=2)
  f = lambda q, k, v: jnp.sum(flash.blockwise_attention(q, k, v, info, block_q=32, block_k=32) * ct)
  _, vjp = jax.vjp(f, q, k, v)
  biggest = max(x.size for x in jax.tree.leaves(vjp))
  assert biggest <= q.size     # the probabilities would be B * H * T * S = 64 * q.size


def test_splash_kernel_interpreted_matches_dense_and_falls_back_for_blocks():
  """Pallas splash (run by the Pallas interpreter on CPU) with packed segments
  and a local window; a batch with bidirectional blocks takes the lax.cond
  fallback. One compiled function serves both batches (masks are data)."""
  q, k, v, ct, info = make_inputs(T=128, K=16)
  kernel = functools.partial(attn.splash_kernel, block=32, interpret=True)
  splash, dense = value_and_grads(kernel, True, 9), dense_fn(True, 9)
  no_blocks = info._replace(block_ids_BxT=jnp.zeros_like(info.block_ids_BxT))
  for batch_info in (no_blocks, info):
    assert_same(splash(q, k, v, ct, batch_info), dense(q, k, v, ct, batch_info))
  direct = platform.splash_attention(q, k, v, no_blocks, causal=True, window=9, interpret=True)
  np.testing.assert_allclose(direct, dense(q, k, v, ct, no_blocks)[0][1], atol=ATOL)


def test_splash_kernel_runs_sharded_on_a_multi_device_mesh():
  """Under a data x fsdp x tensor mesh splash runs per device in a shard_map
  (rows and heads split), not the blockwise fallback, and matches dense."""
  from gemjax.parallel import sharding as shd
  q, k, v, ct, info = make_inputs(B=4, T=128, K=16)
  info = info._replace(block_ids_BxT=jnp.zeros_like(info.block_ids_BxT))
  kernel = functools.partial(attn.splash_kernel, block=32, interpret=True)
  want = dense_fn(True, 9)(q, k, v, ct, info)
  mesh = shd.make_mesh({'data': 2, 'fsdp': 2, 'expert': 1, 'context': 1, 'tensor': 2})
  with shd.use_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: kernel(q, k, v, info, causal=True,
                                                      window=9))(q, k, v))
    got = value_and_grads(kernel, True, 9)(q, k, v, ct, info)
  assert 'shard_map' in jaxpr and 'pallas_call' in jaxpr
  assert_same(got, want)


def test_blockwise_inside_layer_scan_keeps_linear_memory():
  """Regression: in a scan over layers the masks are loop-invariant and scan's
  partial eval used to hoist every chunk's mask/fill out of the loop, stacked:
  O(T * S) temporaries. The compiled grad must stay far below one [T, S] f32."""
  T, H = 1024, 2
  q, k, v, ct, info = make_inputs(B=2, T=T, H=H, G=H, K=8)

  def loss(q):
    def layer(x, _):
      return x + flash.blockwise_attention(x, x[:, :, :H], x[:, :, :H], info,
                                        block_q=128, block_k=128), None
    x, _ = jax.lax.scan(layer, q, None, length=2)
    return jnp.sum(x * ct)

  temp = jax.jit(jax.grad(loss)).lower(q).compile().memory_analysis().temp_size_in_bytes
  assert temp < 2 * H * T * T * 4 / 4, temp


def test_noncausal_window_bounds_the_past_only():
  # The documented (gemjax/kernels/mask.py) one-sided window: without the
  # causal mask a query sees every later key and the window - 1 before it.
  T, W = 8, 3
  idx = jnp.arange(T, dtype=jnp.int32)[None]
  ones, zeros = jnp.ones((1, T), jnp.int32), jnp.zeros((1, T), jnp.int32)
  got = visible_mask(ones, ones, zeros, zeros, idx, idx, causal=False, window=W)[0]
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  np.testing.assert_array_equal(got, i - j < W)
  np.testing.assert_array_equal(visible_mask(ones, ones, zeros, zeros, idx, idx, causal=True,
                                             window=W)[0], (i - j < W) & (j <= i))


def test_platform_fallback_is_named_for_the_startup_log():
  fb = functools.partial(attn.platform_fallback, seq_len=256, head_dim=128,
                         compute_dtype='auto')
  assert "backend is cpu" in fb('splash', backend='cpu')
  assert "backend is cpu" in fb('cudnn', backend='cpu')
  assert 'multiples of 128' in attn.platform_fallback('splash', seq_len=200, head_dim=128,
                                                      compute_dtype='auto', backend='tpu')
  assert 'bidirectional blocks' in fb('splash', backend='tpu')
  assert 'packed and padded text rows run cuDNN' in fb('cudnn', backend='gpu')
  assert "compute_dtype='float32'" in attn.platform_fallback(
      'cudnn', seq_len=256, head_dim=128, compute_dtype='float32', backend='gpu')
  # On a GPU older than Hopper (here: pretend the CPU host is one).
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax, 'default_backend', lambda: 'gpu')
    assert 'compute capability 9.0' in fb('cudnn', backend='gpu')
  assert fb('blockwise', backend='tpu') is None and fb('ring', backend='gpu') is None


@pytest.mark.parametrize('kernel', ['dense', 'blockwise'])
def test_softcapped_scores_match_autodiff_reference_values_and_grads(kernel):
  # Gemma 2's cap * tanh(s / cap): a small cap so that it bends most scores.
  q, k, v, ct, info = make_inputs()
  q = q * 3.0
  cap = 2.0
  fn = functools.partial(ATTENTION_KERNELS[kernel], block=16, softcap=cap)
  got = value_and_grads(fn, True, 0)(q, k, v, ct, info)
  ref = value_and_grads(functools.partial(naive_attention, softcap=cap), True, 0)
  want = ref(q, k, v, ct, info)
  assert_same(got, want)
  # ... and the cap changes the result (the option is not ignored).
  plain = dense_fn(True, 0)(q, k, v, ct, info)
  assert float(jnp.max(jnp.abs(plain[0][1] - want[0][1]))) > 0.1


def test_softcapped_decode_over_the_cache_equals_the_kernel():
  from gemjax.kernels import cache as cache_lib
  q, k, v, _, info = make_inputs()
  q = q * 3.0
  B, T = q.shape[:2]
  c = cache_lib.init_cache(B, T, k.shape[2], k.shape[3], jnp.float32)
  c = cache_lib.write(c, k, v, info.index_BxT, jnp.ones((B, T), bool))
  seg1 = jnp.ones((B, T), jnp.int32)
  one_doc = info._replace(segment_ids_BxT=seg1, block_ids_BxT=0 * seg1)
  want = naive_attention(q, k, v, one_doc, causal=True, softcap=2.0)
  got = cache_lib.attend(q, c, info.index_BxT, softcap=2.0)
  np.testing.assert_allclose(got, want, atol=ATOL)
