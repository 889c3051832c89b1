"""Sparse MoE: routing, losses, both compute paths, expert parallelism, training.

References are independent of the code under test: a per-token numpy loop, the
load-balance formula written out, a hand-made routing with known drops, and
the one-device run (f32, matmul precision 'highest', atol 1e-5) for the
expert-parallel meshes.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.model import flops, moe
from gemjax.model.info import SequenceInfo
from gemjax.model.spec import decoder_spec
from gemjax.parallel import expert as expert_lib
from gemjax.parallel import sharding as shd

ATOL = 1e-5
E, K, D, F = 8, 2, 32, 16
B, T = 8, 16


def _mesh(sizes, n=None):
  full = {a: 1 for a in shd.MESH_AXES} | sizes
  n = n or math.prod(sizes.values())
  return shd.make_mesh(full, devices=jax.devices()[:n])


def _info(seg, mod):
  b, t = seg.shape
  z = jnp.zeros((b, t), jnp.int32)
  return SequenceInfo(jnp.zeros((b, t, 3), jnp.int32), jnp.asarray(seg), z, z, jnp.asarray(mod))


def _inputs():
  x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
  seg = np.ones((B, T), np.int32)
  # Padding (routed nowhere), different in every row, so devices holding
  # different rows route different numbers of tokens; one row is all padding.
  for b, pad in enumerate((3, 0, 7, 12, 1, T, 5, 9)):
    seg[b, T - pad:] = 0
  mod = np.zeros((B, T), np.int8)
  mod[:, 4:9] = 1                        # an image block in every row
  r = jax.random.normal(jax.random.key(2), (B, T, D), jnp.float32)
  return x, _info(seg, mod), r


@functools.cache
def _model(path, *, shared=0, cf=1.25):
  # Built once per setting under jit: eager init compiles op by op (seconds).
  return nnx.jit(lambda: moe.MoE(D, F, E, K, shared_dim=shared * F, path=path,
                                 capacity_factor=cf, rngs=nnx.Rngs(0)))()


def _shard_state(state, mesh):
  def put(v):
    names = v.get_metadata().get('out_sharding')
    return v.replace(jax.device_put(v.get_value(), shd.named_sharding(mesh, names)))
  return jax.tree.map(put, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _loss_and_grads(model, mesh=None):
  """(y, aux, grads wrt (params, x)) of a scalar that touches every output."""
  x, info, r = _inputs()
  graphdef, state = nnx.split(model)

  def f(state, x):
    y, aux = nnx.merge(graphdef, state)(x, info)
    loss = jnp.sum(y * r) / (B * T) + aux['moe_lb_loss'] + aux['moe_z_loss']
    return loss, (y, aux)

  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  if mesh is None:
    (_, (y, aux)), grads = fn(state, x)
  else:
    with shd.use_mesh(mesh):
      xs = jax.device_put(x, shd.named_sharding(mesh, ('batch', 'length', None)))
      (_, (y, aux)), grads = fn(_shard_state(state, mesh), xs)
  return jax.tree.map(np.asarray, (y, aux, nnx.to_pure_dict(grads[0]), grads[1]))


# ------------------------------------------------------------------- routing


def test_top_k_ties_go_to_the_lower_expert_index_deterministically():
  logits = jnp.array([[[0., 0., 0., 0.],
                       [1., 3., 3., 0.],
                       [2., 5., 2., 2.]]])
  for fn in (moe.top_k_routing, jax.jit(moe.top_k_routing, static_argnums=1,
                                        static_argnames='renormalize')):
    expert, gate, _ = fn(logits, 2, renormalize=True)
    np.testing.assert_array_equal(expert[0], [[0, 1], [1, 2], [1, 0]])
    np.testing.assert_allclose(gate[0, :2], 0.5, atol=1e-7)


def test_load_balance_loss_equals_switch_formula():
  logits = jax.random.normal(jax.random.key(0), (2, 12, E)) * 2
  valid = np.ones((2, 12), bool)
  valid[1, 7:] = False

  @jax.jit
  def losses(logits, valid):
    expert, _, probs = moe.top_k_routing(logits, K, renormalize=True)
    return (expert, probs, moe.load_balance_loss(probs, expert, valid),
            moe.router_z_loss(logits, valid))

  expert, probs, got, z = losses(logits, jnp.asarray(valid))
  e, p = np.asarray(expert)[valid], np.asarray(probs)[valid]
  f_e = np.bincount(e.ravel(), minlength=E) / e.size
  want = E * np.sum(f_e * p.mean(0))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))[valid]
  np.testing.assert_allclose(z, np.mean(lse ** 2), rtol=1e-6)


def test_load_balance_loss_is_minimal_for_uniform_routing():
  n = 4 * E

  @jax.jit
  def lb_of(assign):  # confident router (probs ~ one-hot) sending token i to assign[i]
    logits = 30.0 * jax.nn.one_hot(assign[None], E)
    expert, _, probs = moe.top_k_routing(logits, 1, renormalize=False)
    return moe.load_balance_loss(probs, expert, jnp.ones((1, n), bool))

  lb = lambda assign: float(lb_of(jnp.asarray(assign, jnp.int32)))

  uniform = lb(np.arange(n) % E)
  np.testing.assert_allclose(uniform, 1.0, atol=1e-5)
  rng = np.random.default_rng(0)
  for _ in range(5):
    assert lb(rng.integers(0, E, n)) > uniform + 1e-3
  np.testing.assert_allclose(lb(np.zeros(n, int)), E, rtol=1e-5)  # collapse: worst
  # A router that knows nothing (uniform probs) also scores exactly 1.
  expert, _, probs = moe.top_k_routing(jnp.zeros((1, n, E)), K, renormalize=True)
  np.testing.assert_allclose(moe.load_balance_loss(probs, expert, jnp.ones((1, n), bool)),
                             1.0, rtol=1e-6)


# ----------------------------------------------------------------- the paths


def _swiglu_np(x, wg, wu, wd):
  g, u = x @ wg, x @ wu
  return (g / (1 + np.exp(-g)) * u) @ wd


def test_dropless_drops_nothing_and_matches_per_token_loop():
  model = _model('dropless', shared=1)
  x, info, _ = _inputs()
  y, aux = jax.jit(lambda m, x: m(x, info))(model, x)
  assert float(aux['moe_dropped']) == 0.0

  p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model)))
  xs = np.asarray(x, np.float64)
  seg = np.asarray(info.segment_ids_BxT)
  want = np.zeros_like(xs)
  for b in range(B):
    for t in range(T):
      xt = xs[b, t]
      want[b, t] = _swiglu_np(xt, p['shared']['w_gate_DxF'], p['shared']['w_up_DxF'],
                              p['shared']['w_down_FxD'])
      if seg[b, t] == 0:
        continue  # padding: shared expert only
      logits = xt @ p['router_DxE']
      top = np.argsort(-logits, kind='stable')[:K]
      gates = np.exp(logits[top] - logits[top].max())
      for e, g in zip(top, gates / gates.sum()):
        want[b, t] += g * _swiglu_np(xt, p['w_gate_ExDxF'][e], p['w_up_ExDxF'][e],
                                     p['w_down_ExFxD'][e])
  np.testing.assert_allclose(y, want, atol=ATOL, rtol=0)


def _scale_experts():
  """Expert e multiplies its input by scale[e]: outputs show who computed what."""
  return expert_lib.ExpertFns(
      batched=lambda w, x_ExMxD: x_ExMxD * w[0][:, None, None],
      grouped=lambda w, x, sizes: x * jnp.repeat(w[0], sizes, total_repeat_length=x.shape[0])[:, None])


def test_capacity_path_drops_exactly_the_assignments_beyond_capacity():
  # 4 experts, top-2, 4 tokens per row, capacity_factor 1 -> C = ceil(4*2/4) = 2.
  # Priority: every first choice of the row, in token order, then second choices.
  # Row 0: expert 0 is the first choice of t0, t2, t3 -> t3's first choice drops,
  #        and t1's second choice (also expert 0) drops behind them.
  # Row 1: the same routing, but t0 is padding: it takes no slot, so t3's first
  #        choice fits (t1's second choice still does not).
  E4, C = 4, expert_lib.expert_capacity(4, 4, 2, 1.0)
  assert C == 2
  route = [[0, 1], [1, 0], [0, 2], [0, 3]]
  expert_BxTxK = jnp.asarray([route, route], jnp.int32)
  gate_BxTxK = jnp.asarray(np.tile([0.75, 0.25], (2, 4, 1)), jnp.float32)
  valid_BxT = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1]], bool)
  x_BxTxD = jnp.ones((2, 4, 1), jnp.float32)
  scale = (jnp.asarray([1., 10., 100., 1000.]),)
  want_kept = np.array([[[1, 1], [1, 0], [1, 1], [0, 1]],
                        [[0, 0], [1, 0], [1, 1], [1, 1]]], bool)
  gate = np.asarray(gate_BxTxK)
  want_y = (want_kept * gate * np.asarray(scale[0])[np.asarray(expert_BxTxK)]).sum(-1)

  def run():
    return jax.jit(lambda x, e, g, v, w: expert_lib.dispatch_combine(
        x, e, g, v, w, (('experts',),), _scale_experts(), num_experts=E4,
        path='capacity', capacity_factor=1.0))(x_BxTxD, expert_BxTxK, gate_BxTxK,
                                               valid_BxT, scale)

  y, kept = run()
  np.testing.assert_array_equal(kept, want_kept)
  np.testing.assert_allclose(y[..., 0], want_y, rtol=1e-6)
  # Rows are the capacity groups, so the drops are the same with the experts
  # (and the rows) split over two devices.
  with shd.use_mesh(_mesh({'expert': 2})):
    y2, kept2 = run()
  np.testing.assert_array_equal(kept2, want_kept)
  np.testing.assert_allclose(y2, y, rtol=1e-6)


def test_top_k_masks_order_like_lax_top_k_with_ties_and_infinities():
  rng = np.random.default_rng(0)
  for trial in range(60):
    e_ = int(rng.integers(1, 10))
    k_ = int(rng.integers(1, e_ + 1))
    logits = rng.integers(-2, 2, size=(2, 7, e_)).astype(np.float32)  # many ties
    if trial % 3 == 0:
      logits[logits == -2] = -np.inf
    if trial % 4 == 0:
      logits = rng.normal(size=(2, 7, e_)).astype(np.float32)
    expert, gate, probs = moe.top_k_routing(jnp.asarray(logits), k_, renormalize=False)
    _, want = jax.lax.top_k(jnp.asarray(logits), k_)
    np.testing.assert_array_equal(expert, want)
    np.testing.assert_array_equal(gate, np.take_along_axis(np.asarray(probs), np.asarray(want), -1))


def test_swiglu_act_vjp_matches_autodiff():
  g, u, dh = (jax.random.normal(k, (3, 5, 7)) * 3 for k in jax.random.split(jax.random.key(0), 3))
  want = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)[1](dh)
  y, vjp = jax.vjp(moe.swiglu_act, g, u)
  np.testing.assert_allclose(y, jax.nn.silu(g) * u, rtol=1e-6)
  for a, b in zip(vjp(dh), want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _gshard_keep(expert, valid, num_experts, capacity):
  """Reference drops, written as the GShard loop: walk a row's assignments in
  priority order (every first choice in token order, then every second
  choice, ...), counting per expert; the first `capacity` of each are kept."""
  b_, t_, k_ = expert.shape
  keep = np.zeros((b_, t_, k_), bool)
  for b in range(b_):
    count = np.zeros(num_experts, int)
    for k in range(k_):
      for t in range(t_):
        if valid[b, t]:
          keep[b, t, k] = count[expert[b, t, k]] < capacity
          count[expert[b, t, k]] += 1
  return keep


@pytest.mark.parametrize('e_, k_, cf, sizes', [
    (6, 2, 0.75, None), (4, 3, 1.0, None), (8, 1, 1.25, None),
    (8, 2, 1.0, {'expert': 4}), (8, 2, 0.75, {'data': 2, 'expert': 2, 'tensor': 2})],
    ids=['e6k2', 'e4k3', 'e8k1', 'expert4', 'data2_expert2_tensor2'])
def test_capacity_dispatch_matches_gshard_reference_with_drops_and_uneven_padding(
    e_, k_, cf, sizes):
  """Outputs, kept assignments and gradients (tokens, gates, expert weights)
  against a reference that runs every expert on every token and keeps what
  the GShard loop keeps; rows padded unevenly (one entirely), T = 13 tokens
  not a multiple of E, and a router skewed towards high experts so that
  some of them overflow."""
  b_, t_ = 4, 13
  ks = jax.random.split(jax.random.key(7), 6)
  x = jax.random.normal(ks[0], (b_, t_, D))
  logits = jax.random.normal(ks[1], (b_, t_, e_)) + jnp.linspace(0.0, 2.0, e_)
  expert, gate, _ = moe.top_k_routing(logits, k_, renormalize=True)
  valid = np.ones((b_, t_), bool)
  for b, pad in enumerate((0, 5, t_, 1)):
    valid[b, t_ - pad:] = False
  w = tuple(jax.random.normal(k, s) / math.sqrt(s[1]) for k, s in
            zip(ks[2:5], ((e_, D, F), (e_, D, F), (e_, F, D))))
  r = jax.random.normal(ks[5], (b_, t_, D))
  cap = expert_lib.expert_capacity(t_, e_, k_, cf)
  keep = _gshard_keep(np.asarray(expert), valid, e_, cap)
  assert 0 < (~keep & valid[..., None]).sum() < keep.sum()  # some drops, most kept

  def reference(x, gate, w):
    g = jnp.einsum('btd,edf->btef', x, w[0])
    u = jnp.einsum('btd,edf->btef', x, w[1])
    y_all = jnp.einsum('btef,efd->bted', jax.nn.silu(g) * u, w[2])
    y_k = jnp.take_along_axis(y_all, expert[..., None], axis=2)
    return jnp.sum(jnp.where(keep[..., None], gate[..., None] * y_k, 0.0), axis=2)

  def under_test(x, gate, w):
    y, kept = expert_lib.dispatch_combine(
        x, expert, gate, jnp.asarray(valid), w, (moe._W_IN_NAMES, moe._W_IN_NAMES,
                                                 moe._W_OUT_NAMES),
        moe.SWIGLU_EXPERTS, num_experts=e_, path='capacity', capacity_factor=cf)
    return y, kept

  def loss(fn):
    return lambda x, gate, w: jnp.sum(fn(x, gate, w) * r)

  want_y = reference(x, gate, w)
  want_g = jax.grad(loss(reference), argnums=(0, 1, 2))(x, gate, w)
  run = jax.jit(lambda x, gate, w: (under_test(x, gate, w), jax.grad(
      loss(lambda *a: under_test(*a)[0]), argnums=(0, 1, 2))(x, gate, w)))
  if sizes is None:
    (y, kept), grads = run(x, gate, w)
  else:
    with shd.use_mesh(_mesh(sizes)):
      (y, kept), grads = run(x, gate, w)
  np.testing.assert_array_equal(kept, keep)
  np.testing.assert_allclose(y, want_y, atol=ATOL, rtol=0)
  assert not np.asarray(y)[~valid].any()  # padding tokens get nothing
  for name, a, b in zip(('x', 'gate'), grads[:2], want_g[:2]):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=name)
  for name, a, b in zip(('gate', 'up', 'down'), grads[2], want_g[2]):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=name)


def test_routing_runs_per_device_without_gathering_tokens():
  """On a data-parallel mesh every device routes its own tokens: no
  all-gather (lax.top_k would gather the logits of the whole batch)."""
  mesh = _mesh({'data': 8})
  x, info, _ = _inputs()
  graphdef, state = nnx.split(_model('capacity', cf=1.0))
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, info))
  with shd.use_mesh(mesh):
    xs = jax.device_put(x, shd.named_sharding(mesh, ('batch', 'length', None)))
    hlo = fwd.lower(_shard_state(state, mesh), xs).compile().as_text()
  assert 'all-gather' not in hlo


# ------------------------------------------------------- expert parallelism

MESHES = [{'expert': 8}, {'data': 2, 'expert': 4}, {'data': 2, 'fsdp': 2, 'expert': 2},
          # expert hidden split over tensor: partial sums reduced in the dispatcher
          {'data': 2, 'expert': 2, 'tensor': 2}]
# capacity_factor 1.0 drops ~5% here: drops must match too, not only the math.
PATH_MODELS = {'capacity': dict(cf=1.0), 'dropless': dict(shared=1)}


@pytest.fixture(scope='module')
def references():
  return {path: _loss_and_grads(_model(path, **kw)) for path, kw in PATH_MODELS.items()}


@pytest.mark.parametrize('path', list(PATH_MODELS))
@pytest.mark.parametrize('sizes', MESHES, ids=lambda s: '_'.join(f'{k}{v}' for k, v in s.items()))
def test_expert_parallel_output_and_grads_match_single_device(references, path, sizes):
  y_ref, aux_ref, g_ref, gx_ref = references[path]
  y, aux, g, gx = _loss_and_grads(_model(path, **PATH_MODELS[path]), _mesh(sizes))
  if path == 'capacity':
    assert aux_ref['moe_dropped'] > 0.01
  np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=0)
  np.testing.assert_allclose(gx, gx_ref, atol=ATOL, rtol=0)
  for k in aux_ref:
    np.testing.assert_allclose(aux[k], aux_ref[k], atol=ATOL, rtol=0, err_msg=k)
  for (path_g, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g),
                                 jax.tree_util.tree_leaves_with_path(g_ref)):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=jax.tree_util.keystr(path_g))


def test_dropless_expert_parallel_uses_ragged_all_to_all_off_cpu():
  """The real collective (not the CPU emulation) traces and lowers, with its VJP."""
  mesh = _mesh({'expert': 8})
  x, info, _ = _inputs()
  e, g, _ = moe.top_k_routing(jax.random.normal(jax.random.key(3), (B, T, E)), K,
                              renormalize=True)
  w = tuple(jnp.ones(s) for s in ((E, D, F), (E, D, F), (E, F, D)))
  names = (moe._W_IN_NAMES, moe._W_IN_NAMES, moe._W_OUT_NAMES)

  def f(x, w):
    y, _ = expert_lib.dispatch_combine(x, e, g, info.segment_ids_BxT > 0, w, names,
                                       moe.SWIGLU_EXPERTS, num_experts=E, path='dropless',
                                       emulate_ragged=False)
    return jnp.sum(y)

  with shd.use_mesh(mesh):
    fwd = jax.jit(f).lower(x, w).as_text()
    bwd = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()
  assert fwd.count('ragged_all_to_all') == 2  # there and back
  # grad: the way there, and the transposes of both trips.
  assert bwd.count('ragged_all_to_all') == 3


def _emulated_ragged(mesh, operand, output, in_off, send, out_off, recv):
  """The CPU emulation under a shard_map over 'expert': per-device rows stacked."""
  P_ = jax.sharding.PartitionSpec
  n = mesh.shape['expert']
  fn = jax.shard_map(
      functools.partial(expert_lib.ragged_all_to_all, axis_name='expert', num_shards=n,
                        emulate=True),
      mesh=mesh, in_specs=(P_('expert'),) * 6, out_specs=P_('expert'))
  args = [jnp.asarray(np.concatenate(a)) for a in (operand, output, in_off, send, out_off,
                                                    recv)]
  return np.asarray(jax.jit(fn)(*args)).reshape(n, -1, *np.shape(operand[0])[1:])


def test_ragged_emulation_follows_the_documented_ragged_all_to_all():
  """The emulation CPU tests rely on computes what `jax.lax.ragged_all_to_all`
  is documented to compute (the real op cannot run on XLA:CPU): its
  docstring's worked example exactly, and its send/receive pseudo-code,
  written in numpy, on random ragged slices with gaps over 4 devices."""
  rows = lambda a: np.asarray(a, np.float32)[..., None]    # rows of one feature
  got = _emulated_ragged(_mesh({'expert': 2}),
                         rows([[1, 2, 2], [3, 4, 0]]), rows([[0] * 4, [0] * 4]),
                         *(np.asarray(a, np.int32) for a in (
                             [[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]],
                             [[1, 1], [2, 1]])))
  np.testing.assert_array_equal(got[..., 0], [[1, 3, 0, 0], [2, 2, 4, 0]])

  Pn, M, R, D_ = 4, 16, 20, 3
  rng = np.random.default_rng(0)
  send = rng.integers(0, 4, size=(Pn, Pn))                  # send[i, j]: i -> j
  in_off = np.stack([np.cumsum(send[i]) - send[i] + np.arange(Pn) % 2 for i in range(Pn)])
  recv = send.T.copy()                                      # recv[j, i] = send[i, j]
  land = np.stack([np.cumsum(recv[j]) - recv[j] + 1 for j in range(Pn)])  # gap at row 0
  out_off = land.T.copy()                                   # sender i: where it lands on j
  operand = rng.normal(size=(Pn, M, D_)).astype(np.float32)
  output = np.full((Pn, R, D_), -1.0, np.float32)
  want = output.copy()
  for i in range(Pn):                                       # the docstring's SEND/RECEIVE
    for j in range(Pn):
      want[j, out_off[i, j]:out_off[i, j] + send[i, j]] = \
          operand[i, in_off[i, j]:in_off[i, j] + send[i, j]]
  got = _emulated_ragged(_mesh({'expert': Pn}), operand, output,
                         *(a.astype(np.int32) for a in (in_off, send, out_off, recv)))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_auto_path_is_capacity_on_every_backend(monkeypatch, backend):
  """Dropless's real ragged exchange has never run on an accelerator here:
  'auto' must not pick it anywhere; asking for it by name still works."""
  monkeypatch.setattr(expert_lib.jax, 'default_backend', lambda: backend)
  assert expert_lib.resolve_path('auto') == 'capacity'
  assert expert_lib.resolve_path('dropless') == 'dropless'
  with pytest.raises(ValueError, match="'ragged'"):
    expert_lib.resolve_path('ragged')


# ------------------------------------------------------------------ the model

TINY_MOE = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
            'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
            'model.vocab_size=256', 'train.batch_size=8', 'train.seq_len=32',
            'model.moe.num_experts=4', 'model.moe.top_k=2', 'model.moe.expert_dim=32',
            'model.moe.moe_every=2', 'optimizer.learning_rate=1e-2',
            'optimizer.warmup_steps=0', 'mesh.data=2', 'mesh.fsdp=2', 'mesh.expert=2']


@pytest.mark.slow
def test_moe_model_trains_with_decreasing_loss_on_an_expert_parallel_mesh():
  from gemjax.data.registry import make_iterator
  from gemjax.train import state as S

  cfg = load_config(None, TINY_MOE)
  sizes = {a: getattr(cfg.mesh, a) for a in shd.MESH_AXES}
  mesh = shd.make_mesh(sizes, devices=jax.devices())
  mdef = S.model_def(cfg.model)
  tx = S.make_optimizer(cfg.optimizer, 20, mdef.groups)
  state = S.init_state(cfg.model, mdef, tx, mesh, seed=0)
  w = state['params']['layers']['blocks'][1]['mlp']['w_up_ExDxF']
  assert w.addressable_shards[0].data.shape == (1, 2, 16, 32)  # [layers, E/2, D/2, F]
  it = make_iterator(cfg, 'train')
  batches = [next(it) for _ in range(2)]
  bshards = S.batch_shardings(mesh, {k: v.ndim for k, v in batches[0].items()})
  step = S.jit_train_step(S.make_train_step(mdef, tx, cfg.model, S.lr_schedule(cfg.optimizer, 20)),
                          S.state_shardings(mdef, tx, mesh), bshards)
  losses = []
  with shd.use_mesh(mesh):
    for i in range(8):
      state, metrics = step(state, S.to_global(batches[i % 2], bshards))
      losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.3 and losses[-2] < losses[0] - 0.3, losses
  load = np.asarray(metrics['aux/moe_load/block1'])
  assert load.shape == (1, 4)
  np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-5)
  assert np.asarray(metrics['aux/moe_load_by_modality/block1']).shape == (1, 5, 4)
  assert float(metrics['aux/moe_lb_loss/block1'].sum()) > 0
  assert 'aux/moe_load/block0' not in metrics  # block 0 is dense (moe_every=2)


def test_flops_count_active_experts_on_moe_layers_only():
  cfg = decoder_spec(load_config(None, TINY_MOE).model)
  dense = decoder_spec(load_config(None, TINY_MOE[:7]).model)
  assert flops.num_moe_layers(cfg) == 1
  d = cfg.d_model
  moe_layer = d * 4 + 2 * 3 * d * 32  # router + top_k experts
  assert (flops.matmul_params_per_token(cfg) - flops.matmul_params_per_token(dense)
          == moe_layer - 3 * d * cfg.period[0].mlp.mlp_dim)


def test_moe_config_errors_name_the_key():
  with pytest.raises(ConfigError, match='model.moe.top_k'):
    load_config(None, ['model.moe.num_experts=4', 'model.moe.top_k=5'])
  with pytest.raises(ConfigError, match='model.moe.path'):
    load_config(None, ['model.moe.num_experts=4', 'model.moe.path=ragged'])
  from gemjax.parallel.mesh import validate_mesh
  cfg = load_config(None, ['model.moe.num_experts=6', 'mesh.data=1', 'mesh.expert=4',
                           'train.batch_size=8'])
  with pytest.raises(ConfigError, match='model.moe.num_experts'):
    validate_mesh(cfg, 4)
  assert load_config('configs/nano-moe.yaml').model.moe.num_experts == 8


def test_expert_load_heat_map_png(tmp_path):
  from gemjax.eval import moe_plots
  rng = np.random.default_rng(0)
  load = rng.dirichlet(np.ones(4), size=(3, 5))   # [groups, modalities, experts]
  load[:, 2:] = 0                                 # only text and image present
  metrics = {'aux/moe_load_by_modality/block1': load, 'aux/moe_load/block1': load[:, 0],
             'loss': 1.0}
  arr, layers = moe_plots.expert_load_from_metrics(metrics, period=2)
  assert layers == [1, 3, 5] and arr.shape == (3, 5, 4)
  out = moe_plots.plot_expert_load(arr, str(tmp_path / 'load.png'), layers=layers)
  with open(out, 'rb') as fh:
    assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
