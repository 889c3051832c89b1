"""Bounded dropless receive buffer (`model.moe.dropless_buffer_factor`).

References: the buffer-size formula written out; the worst-case buffer
(factor 0) for a bound that nothing overflows; and, where the bound bites, a
round-robin loop that hands out the R rows of each receiving shard one per
(source, local expert) segment per turn, plus a dense reference that runs
every expert on every token and keeps what that loop keeps (f32, matmul
precision 'highest', atol 1e-5).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.model import moe
from gemjax.model.spec import decoder_spec
from gemjax.parallel import expert as expert_lib
from gemjax.parallel import sharding as shd

ATOL = 1e-5
E, K, D, F = 8, 2, 32, 16
B, T = 8, 16
NAMES = (moe._W_IN_NAMES, moe._W_IN_NAMES, moe._W_OUT_NAMES)


def _mesh(sizes):
  full = {a: 1 for a in shd.MESH_AXES} | sizes
  return shd.make_mesh(full, devices=jax.devices()[:math.prod(sizes.values())])


def _valid(pads):
  valid = np.ones((B, T), bool)
  for b, pad in enumerate(pads):
    valid[b, T - pad:] = False
  return valid


def _weights(key):
  ks = jax.random.split(key, 3)
  return tuple(jax.random.normal(k, s) / math.sqrt(s[1]) for k, s in
               zip(ks, ((E, D, F), (E, D, F), (E, F, D))))


def _dense_reference(x, expert, gate, keep, w):
  """Every expert on every token; the gated sum over the kept assignments."""
  g = jnp.einsum('btd,edf->btef', x, w[0])
  u = jnp.einsum('btd,edf->btef', x, w[1])
  y_all = jnp.einsum('btef,efd->bted', jax.nn.silu(g) * u, w[2])
  y_k = jnp.take_along_axis(y_all, expert[..., None], axis=2)
  return jnp.sum(jnp.where(keep[..., None], gate[..., None] * y_k, 0.0), axis=2)


def _run(mesh, x, expert, gate, valid, w, r, factor):
  """(y, kept) and the gradients of sum(y * r) wrt (x, gate, w)."""
  def f(x, gate, w):
    return expert_lib.dispatch_combine(
        x, expert, gate, jnp.asarray(valid), w, NAMES, moe.SWIGLU_EXPERTS, num_experts=E,
        path='dropless', dropless_buffer_factor=factor)

  def loss(x, gate, w):
    return jnp.sum(f(x, gate, w)[0] * r)

  fn = jax.jit(lambda x, gate, w: (f(x, gate, w), jax.grad(loss, argnums=(0, 1, 2))(x, gate, w)))
  with shd.use_mesh(mesh):
    return jax.tree.map(np.asarray, fn(x, gate, w))


def _round_robin_keep(expert, valid, groups, shards, rows):
  """Reference drops: on each receiving shard, the rows routed to it form
  (source, local expert) segments in that order, each in priority order (first
  choices in token order, then second choices); one row per segment per turn
  is kept until `rows` are kept or none is left."""
  b_, t_, k_ = expert.shape
  el = E // shards
  keep = np.zeros(expert.shape, bool)
  for g in range(groups):
    for p in range(shards):
      segs = [[(b, t, k) for k in range(k_) for t in range(t_)
               if valid[b, t] and expert[b, t, k] == p * el + l]
              for b in range(g * shards, (g + 1) * shards) for l in range(el)]
      left, turn = rows, 0
      while left and any(turn < len(s) for s in segs):
        for s in segs:
          if left and turn < len(s):
            keep[s[turn]] = True
            left -= 1
        turn += 1
  return keep


def test_dropless_receive_rows_bounds_the_worst_case_at_nano_moe_shapes():
  # nano-moe: batch 16 x 128 tokens on 8 expert shards -> N = 256 per device,
  # 8 experts, top-2: worst case 8 * 256 * min(2, 1) = 2048 rows for the
  # N * k = 512 a shard receives when routing is balanced.
  n, e, k, p = 16 * 128 // 8, 8, 2, 8
  assert expert_lib.dropless_receive_rows(n, e, k, p, 0.0) == 2048
  for f in (1.0, 1.25, 1.5, 2.0):
    rows = expert_lib.dropless_receive_rows(n, e, k, p, f)
    assert rows % 8 == 0 and math.ceil(f * n * k) <= rows < math.ceil(f * n * k) + 8
  assert expert_lib.dropless_receive_rows(n, e, k, p, 1.25) == 640
  assert expert_lib.dropless_receive_rows(n, e, k, p, 10.0) == 2048  # never above the worst case
  assert expert_lib.dropless_receive_rows(13, 8, 2, 4, 1.1) == 32    # ceil(28.6) -> 29 -> 32
  assert expert_lib.dropless_receive_rows(16, 8, 3, 4, 0.0) == 4 * 16 * 2  # min(k, E/P) = 2
  with pytest.raises(ValueError, match='dropless_buffer_factor'):
    expert_lib.dropless_receive_rows(n, e, k, p, -0.5)


def test_bounded_dropless_without_overflow_equals_the_worst_case_buffer():
  """A bound above every shard's load changes nothing but the buffer size:
  the same kept mask (all valid assignments), outputs and gradients."""
  mesh = _mesh({'expert': 8})
  n = B * T // 8
  ks = jax.random.split(jax.random.key(11), 4)
  x = jax.random.normal(ks[0], (B, T, D))
  expert, gate, _ = moe.top_k_routing(jax.random.normal(ks[1], (B, T, E)), K, renormalize=True)
  valid = _valid((3, 0, 7, 12, 1, T, 5, 9))
  w, r = _weights(ks[2]), jax.random.normal(ks[3], (B, T, D))
  factor = 2.0
  rows = expert_lib.dropless_receive_rows(n, E, K, 8, factor)
  assert rows == 64 < expert_lib.dropless_receive_rows(n, E, K, 8, 0.0) == 128
  # Each shard (one expert) receives what the whole batch routes to its expert.
  load = np.bincount(np.asarray(expert)[valid].ravel(), minlength=E)
  assert load.max() <= rows

  (y0, kept0), g0 = _run(mesh, x, expert, gate, valid, w, r, 0.0)
  (y, kept), g = _run(mesh, x, expert, gate, valid, w, r, factor)
  np.testing.assert_array_equal(kept0, np.broadcast_to(valid[..., None], kept0.shape))
  np.testing.assert_array_equal(kept, kept0)
  np.testing.assert_allclose(y, y0, atol=ATOL, rtol=0)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_bounded_dropless_skewed_routing_keeps_round_robin_share_and_drops_to_zero():
  """Every token picks both experts of shard 1 (of 4; 2 data groups), rows
  padded unevenly: shard 1 of each group is sent 4 * 16 * 2 rows minus
  padding and keeps exactly its R = 32; the kept ones are the round-robin
  reference's, computed exactly; dropped ones add nothing; gradients match
  the masked dense reference."""
  groups, shards, factor = 2, 4, 1.0
  mesh = _mesh({'data': groups, 'expert': shards})
  n = B * T // (groups * shards)
  rows = expert_lib.dropless_receive_rows(n, E, K, shards, factor)
  assert rows == 32
  ks = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(ks[0], (B, T, D))
  first = jax.random.bernoulli(ks[1], 0.5, (B, T)).astype(jnp.int32)
  expert = jnp.stack([2 + first, 3 - first], axis=-1)           # experts 2, 3: shard 1
  gate = jax.nn.softmax(jax.random.normal(ks[2], (B, T, K)), axis=-1)
  valid = _valid((0, 5, T, 1, 3, 9, 2, 12))                     # row b: group b // 4, source b % 4
  w, r = _weights(ks[3]), jax.random.normal(jax.random.key(6), (B, T, D))

  keep = _round_robin_keep(np.asarray(expert), valid, groups, shards, rows)
  for g in range(groups):
    routed = valid[g * shards:(g + 1) * shards].sum() * K
    assert routed > rows
    assert keep[g * shards:(g + 1) * shards].sum() == rows
  # A light source (row 7: 4 tokens) keeps everything, a heavy one is trimmed.
  assert keep[7].sum() == valid[7].sum() * K and keep[4].sum() < valid[4].sum() * K

  (y, kept), grads = _run(mesh, x, expert, gate, valid, w, r, factor)
  np.testing.assert_array_equal(kept, keep)
  for g in range(groups):  # exactly the buffer rows per receiving shard
    assert kept[g * shards:(g + 1) * shards].sum() == rows
  np.testing.assert_allclose(y, _dense_reference(x, expert, gate, keep, w), atol=ATOL, rtol=0)
  # Tokens with every assignment kept match the unbounded run; fully dropped ones get 0.
  (y0, _), _ = _run(mesh, x, expert, gate, valid, w, r, 0.0)
  whole, none = keep.all(-1), valid & ~keep.any(-1)
  assert whole.any() and none.any()
  np.testing.assert_allclose(y[whole], y0[whole], atol=ATOL, rtol=0)
  assert not y[none].any() and not y[~valid].any()

  want = jax.grad(lambda x, gate, w: jnp.sum(_dense_reference(x, expert, gate, keep, w) * r),
                  argnums=(0, 1, 2))(x, gate, w)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_bounded_dropless_lowers_with_the_real_ragged_all_to_all():
  """Off CPU the bounded path uses `jax.lax.ragged_all_to_all` (not the
  emulation), forward and backward, like the worst-case path."""
  ks = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(ks[0], (B, T, D))
  e, g, _ = moe.top_k_routing(jax.random.normal(ks[1], (B, T, E)), K, renormalize=True)
  w = _weights(ks[2])

  def f(x, w):
    y, _ = expert_lib.dispatch_combine(x, e, g, jnp.ones((B, T), bool), w, NAMES,
                                       moe.SWIGLU_EXPERTS, num_experts=E, path='dropless',
                                       dropless_buffer_factor=1.0, emulate_ragged=False)
    return jnp.sum(y)

  with shd.use_mesh(_mesh({'expert': 8})):
    fwd = jax.jit(f).lower(x, w).as_text()
    bwd = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()
  assert fwd.count('ragged_all_to_all') == 2
  assert bwd.count('ragged_all_to_all') == 3


def test_bounded_dropless_drops_show_in_moe_dropped_and_not_when_decoding():
  """Through the MoE layer on an expert mesh: a factor-1 buffer drops some
  of a random router's assignments (moe_dropped > 0), no_drop (decoding)
  drops none, and the config key reaches the layer."""
  spec = decoder_spec(load_config(None, ['model.moe.num_experts=4', 'model.moe.path=dropless',
                                         'model.moe.dropless_buffer_factor=1.5']).model)
  assert {b.mlp.dropless_buffer_factor for b in spec.period} == {1.5}
  model = nnx.jit(lambda: moe.MoE(D, F, E, K, path='dropless', dropless_buffer_factor=1.0,
                                  rngs=nnx.Rngs(0)))()
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  fwd = nnx.jit(lambda m, x, no_drop: m(x, no_drop=no_drop)[1]['moe_dropped'],
                static_argnums=2)
  with shd.use_mesh(_mesh({'expert': 8})):
    dropped, dropped_decoding = float(fwd(model, x, False)), float(fwd(model, x, True))
  assert 0 < dropped < 0.5 and dropped_decoding == 0.0


@pytest.mark.parametrize('value', ['-1.0', '0.5'])
def test_dropless_buffer_factor_below_one_is_a_config_error_naming_the_key(value):
  with pytest.raises(ConfigError, match=rf'model.moe.dropless_buffer_factor={value} is invalid'):
    load_config(None, ['model.moe.num_experts=4', f'model.moe.dropless_buffer_factor={value}'])
  ok = load_config(None, ['model.moe.num_experts=4', 'model.moe.dropless_buffer_factor=1.25'])
  assert ok.model.moe.dropless_buffer_factor == 1.25
  with pytest.raises(ValueError, match='dropless_buffer_factor'):
    moe.MoESpec(D, F, E, K, dropless_buffer_factor=-1.0).build(None)
