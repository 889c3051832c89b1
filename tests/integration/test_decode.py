"""KV-cache decoding: prefill + decode steps give the full forward pass's logits.

For every attention kind the reference is the model's own training forward
pass over the whole sequence on one device; the cached path prefills each
row's prompt (rows of different lengths) and then feeds the true next tokens
one at a time. f32, atol 1e-4 (the cached path sums the softmax in another
order and, on a mesh, merges per-device partial sums).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemjax.config import load_config
from gemjax.inference import decode
from gemjax.model.spec import decoder_spec
from gemjax.parallel import layouts
from gemjax.parallel import sharding as shd

ATOL = 1e-4
B, T = 2, 32
TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4', 'model.num_kv_heads=2',
        'model.head_dim=8', 'model.mlp_dim=64', 'model.vocab_size=64',
        'model.attention_block=8']


def build(extra, seed=0):
  cfg = load_config(None, TINY + list(extra))
  return cfg, decoder_spec(cfg.model).build(nnx.Rngs(seed))


def text_rows(seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, :, None], (B, T, 3)).copy()
  return {'tokens': tokens, 'positions': pos, 'segment_ids': np.ones((B, T), np.int32),
          'block_ids': np.zeros((B, T), np.int32), 'modality': np.zeros((B, T), np.int8)}


@functools.lru_cache(maxsize=None)
def _jitted():
  @functools.partial(jax.jit, static_argnums=0)
  def full(graphdef, state, batch):
    return nnx.merge(graphdef, state)(batch)[0]

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def pre(graphdef, state, batch, max_len):
    model = nnx.merge(graphdef, state)
    return decode.prefill(model, batch, model.init_cache(batch['tokens'].shape[0], max_len))

  @functools.partial(jax.jit, static_argnums=0)
  def step(graphdef, state, tok, dstate, cache):
    return decode.step(nnx.merge(graphdef, state), tok, dstate, cache)

  return full, pre, step


def cached_logits(model, rows, lengths, steps, *, mesh=None, layout=None, max_len=T):
  """[B, steps + 1, V]: the logits after each row's prompt and each fed token."""
  _, pre, step = _jitted()
  graphdef, state = nnx.split(model)
  prompt = dict(rows)
  prompt['segment_ids'] = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  if layout is not None:
    prompt = layouts.apply_layout(prompt, layout, mesh.shape['context'])
  ctx = shd.use_mesh(mesh) if mesh is not None else _null()
  out = []
  with ctx:
    logits, cache, dstate = pre(graphdef, state, prompt, max_len)
    out.append(logits)
    for i in range(steps):
      tok = jnp.asarray(rows['tokens'][np.arange(B), np.asarray(lengths) + i])
      logits, cache, dstate = step(graphdef, state, tok, dstate, cache)
      out.append(logits)
  return np.stack([np.asarray(x) for x in out], axis=1), cache


class _null:
  def __enter__(self):
    return None

  def __exit__(self, *a):
    return False


def full_logits(model, rows):
  full, _, _ = _jitted()
  graphdef, state = nnx.split(model)
  return np.asarray(full(graphdef, state, rows))


def assert_cache_matches_full(extra, *, lengths=(5, 11), steps=16, mesh_axes=None,
                              layout=None):
  cfg, model = build(extra)
  rows = text_rows()
  want = full_logits(model, rows)
  mesh = shd.make_mesh({**dict.fromkeys(shd.MESH_AXES, 1), **mesh_axes}) if mesh_axes else None
  got, cache = cached_logits(model, rows, lengths, steps, mesh=mesh, layout=layout)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(got[b], want[b, n - 1:n + steps], atol=ATOL,
                               err_msg=f'row {b} (prompt length {n})')
  return cache


def test_dense_kernel_cache_matches_full_forward():
  assert_cache_matches_full(['model.attention=dense'])


def test_blockwise_cache_matches_full_forward_on_data_tensor_mesh():
  assert_cache_matches_full(['model.attention=blockwise'], mesh_axes={'data': 2, 'tensor': 2})


def test_sliding_window_layers_keep_a_rolling_buffer_of_window():
  cache = assert_cache_matches_full(['model.local_layers=1', 'model.window=6',
                                     'model.attention=dense'], lengths=(9, 3), steps=20)
  # Layer 0 of the period is local: its buffer has `window` slots, layer 1 all T.
  assert cache[0].k_BxGxSxK.shape[3] == 6 and cache[1].k_BxGxSxK.shape[3] == T


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_infini_cache_matches_full_forward_across_segment_boundaries(update):
  # segment_len 8: prompts end mid-segment (5, 11) and the steps cross 2 boundaries.
  assert_cache_matches_full(['model.attention=infini', 'model.infini.segment_len=8',
                             f'model.infini.update={update}'])


@pytest.mark.parametrize('layout', ['zigzag', 'contiguous'])
def test_ring_cache_sharded_over_context_matches_full_forward(layout):
  cache = assert_cache_matches_full(['model.attention=ring'], lengths=(13, 6),
                                    mesh_axes={'data': 2, 'context': 4}, layout=layout)
  spec = cache[0].k_BxGxSxK.sharding.spec    # [groups, B, G, S, K]
  assert spec[3] == 'context', spec     # slots split over the context axis


def test_moe_decodes_without_dropping_tokens_on_expert_mesh():
  # capacity_factor = E / k: the full forward pass drops nothing either.
  assert_cache_matches_full(['model.moe.num_experts=4', 'model.moe.top_k=2',
                             'model.moe.capacity_factor=2.0', 'model.moe.path=capacity'],
                            mesh_axes={'data': 2, 'expert': 4})


def test_greedy_generate_equals_recompute_reference_for_64_tokens():
  _, model = build(['model.attention=blockwise'], seed=3)
  rows = text_rows(seed=5)
  lengths = np.array([7, 12])
  max_len = 96
  batch = {k: np.zeros((B, max_len) + v.shape[2:], v.dtype) for k, v in rows.items()}
  for k in rows:
    batch[k][:, :T] = rows[k]
  batch['segment_ids'] = (np.arange(max_len)[None] < lengths[:, None]).astype(np.int32)
  graphdef, state = nnx.split(model)
  want = jax.jit(lambda s, b: decode.recompute_tokens(nnx.merge(graphdef, s), b,
                                                      max_new_tokens=64))(state, batch)
  sampler = decode.Sampler(graphdef=graphdef, params=state)
  prompt = {k: v[:, :16] for k, v in batch.items()}
  got = sampler.generate(prompt, max_new_tokens=64, max_len=max_len)
  np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want))
  assert list(np.asarray(got.lengths_B)) == [64, 64]
  # The same loop streamed token by token on the host.
  streamed = np.stack(list(sampler.stream(prompt, max_new_tokens=64, max_len=max_len)), 1)
  np.testing.assert_array_equal(streamed, np.asarray(want))


def test_mixed_length_batch_gives_each_prompt_its_own_output():
  _, model = build([], seed=4)
  rows = text_rows(seed=6)
  sampler = decode.Sampler(model)
  both = dict(rows, segment_ids=(np.arange(T)[None] < np.array([[4], [13]])).astype(np.int32))
  got = np.asarray(sampler.generate(both, max_new_tokens=12, max_len=48).tokens_BxN)
  for b, n in enumerate((4, 13)):
    alone = {k: np.repeat(v[b:b + 1], B, axis=0) for k, v in both.items()}
    one = np.asarray(sampler.generate(alone, max_new_tokens=12, max_len=48).tokens_BxN)
    np.testing.assert_array_equal(got[b], one[0])


def test_stop_tokens_end_rows_and_pad_the_rest():
  _, model = build([], seed=4)
  rows = text_rows(seed=6)
  sampler = decode.Sampler(model)
  free = np.asarray(sampler.generate(rows, max_new_tokens=8, max_len=48).tokens_BxN)
  stop = int(free[0, 2])
  got = sampler.generate(rows, max_new_tokens=8, max_len=48, stop_tokens=[stop], pad_id=-1)
  toks = np.asarray(got.tokens_BxN)
  first = int(np.argmax(free[0] == stop))
  np.testing.assert_array_equal(toks[0, :first + 1], free[0, :first + 1])
  assert (toks[0, first + 1:] == -1).all() and int(got.lengths_B[0]) == first + 1
  assert bool(got.stopped_B[0])


def test_sampling_respects_top_k_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  rng = jax.random.key(0)
  draw = lambda cfg: np.asarray(decode.sample(logits, rng, cfg))
  assert set(draw(decode.SamplingConfig(top_k=2))) == {0, 1}
  assert set(draw(decode.SamplingConfig(top_p=0.7))) == {0, 1}   # 0.5 + 0.3 reaches 0.7
  freq = np.bincount(draw(decode.SamplingConfig()), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  cold = np.bincount(draw(decode.SamplingConfig(temperature=0.25)), minlength=4) / 4000
  assert cold[0] > 0.85
  assert (draw(decode.GREEDY) == 0).all()
  with pytest.raises(ValueError, match='top_p'):
    decode.SamplingConfig(top_p=0.0)
