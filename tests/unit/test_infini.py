"""Infini-attention against a per-segment, per-head transcription of its equations.

The reference below loops over segments and heads in plain jnp and follows
Munkhdalai et al. 2024 eq. 3-6 literally (memory read with un-rotated q,
local causal softmax with RoPE'd q/k, gated sum), sharing only the module's
projections. Both update rules; the first segment (empty memory) must give
finite values and gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemjax.config import InfiniConfig, ModelConfig, OptimizerConfig
from gemjax.model import infini
from gemjax.model.spec import decoder_spec
from gemjax.model.info import SequenceInfo
from gemjax.model.rope import apply_rope
from gemjax.train import state as st

B, T, L = 2, 24, 8          # 3 segments
EPS = infini.MEMORY_EPS


def build(update, num_kv_heads=2, seed=0):
  cfg = ModelConfig(d_model=32, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8,
                    attention='infini', infini=InfiniConfig(segment_len=L, update=update))
  module = decoder_spec(cfg).period[0].attention.build(nnx.Rngs(seed))
  # A non-trivial gate per head, so the test can tell memory and local apart.
  module.memory_gate[...] = jnp.array([-1.0, 0.5, 1.5, 0.0])
  return module


def text_info(seg_BxT):
  seg = jnp.asarray(seg_BxT, jnp.int32)
  Bn, Tn = seg.shape
  pos = jnp.broadcast_to(jnp.arange(Tn, dtype=jnp.int32)[None, :, None], (Bn, Tn, 3))
  idx = jnp.broadcast_to(jnp.arange(Tn, dtype=jnp.int32), (Bn, Tn))
  return SequenceInfo(pos, seg, jnp.zeros_like(seg), idx, jnp.zeros((Bn, Tn), jnp.int8))


def sigma(x):
  return jnp.where(x > 0, x + 1.0, jnp.exp(x))      # ELU + 1, written out


def reference(module, x, info, update):
  """Single document per row: the paper's recurrence, segment by segment."""
  q_raw, k_raw, v = module.project_unrotated(x)
  rope = dict(base=module.rope_base, sections=module.mrope_sections)
  q = apply_rope(q_raw, info.positions_BxTx3, **rope)
  k = apply_rope(k_raw, info.positions_BxTx3, **rope)
  H, G, K = module.num_heads, module.num_kv_heads, module.head_dim
  gate = jax.nn.sigmoid(module.memory_gate[...])
  M = [jnp.zeros((B, K, K)) for _ in range(G)]
  z = [jnp.zeros((B, K)) for _ in range(G)]
  causal = jnp.tril(jnp.ones((L, L), bool))
  outs = []
  for s in range(T // L):
    sl = slice(s * L, (s + 1) * L)
    heads = []
    for h in range(H):
      g = h // (H // G)
      sq = sigma(q_raw[:, sl, h])                                     # [B, L, K]
      a_mem = (jnp.einsum('blk,bkv->blv', sq, M[g]) /
               (jnp.einsum('blk,bk->bl', sq, z[g])[..., None] + EPS))
      scores = jnp.einsum('bik,bjk->bij', q[:, sl, h], k[:, sl, g]) / np.sqrt(K)
      p = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
      a_dot = jnp.einsum('bij,bjk->bik', p, v[:, sl, g])
      heads.append(gate[h] * a_mem + (1 - gate[h]) * a_dot)
    outs.append(jnp.stack(heads, axis=2))
    for g in range(G):
      sk, vv = sigma(k_raw[:, sl, g]), v[:, sl, g]
      if update == 'delta':
        vv = vv - (jnp.einsum('blk,bkv->blv', sk, M[g]) /
                   (jnp.einsum('blk,bk->bl', sk, z[g])[..., None] + EPS))
      M[g] = M[g] + jnp.einsum('blk,blv->bkv', sk, vv)
      z[g] = z[g] + sk.sum(axis=1)
  return module.output(jnp.concatenate(outs, axis=1))


@functools.lru_cache(maxsize=None)
def _apply():
  @functools.partial(jax.jit, static_argnums=0)
  def apply(graphdef, state, x, info):
    return nnx.merge(graphdef, state)(x, info)[0]
  return apply


def run(module, x, info):
  graphdef, state = nnx.split(module)
  return _apply()(graphdef, state, x, info)


@pytest.mark.parametrize('update', infini.UPDATES)
def test_infini_matches_per_segment_reference(update):
  module = build(update)
  x = jax.random.normal(jax.random.key(0), (B, T, 32))
  info = text_info(np.ones((B, T)))
  got = run(module, x, info)
  graphdef, state = nnx.split(module)
  want = jax.jit(lambda state, x: reference(nnx.merge(graphdef, state), x, info, update))(state, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The memory matters: the last segment differs from local attention alone.
  module.memory_gate[...] = jnp.full((4,), -30.0)
  local_only = run(module, x, info)
  assert float(jnp.abs(got - local_only)[:, L:].max()) > 1e-3


def test_infini_first_segment_is_finite_values_and_gradients():
  module = build('delta')
  x = jax.random.normal(jax.random.key(1), (B, T, 32))
  info = text_info(np.ones((B, T)))
  graphdef, state = nnx.split(module)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x, info)[0] ** 2)

  value, (g_state, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_state))
  assert bool(jnp.all(jnp.isfinite(g_x)))
  assert float(jnp.abs(g_state['memory_gate'][...]).sum()) > 0


def test_infini_memory_does_not_cross_packed_documents():
  """A document starting at a segment boundary sees exactly what it sees alone."""
  module = build('linear')
  x = jax.random.normal(jax.random.key(2), (B, T, 32))
  seg = np.ones((B, T), np.int32)
  seg[:, L:] = 2                                     # doc 2 = segments 1, 2
  packed = run(module, x, text_info(seg))
  # Alone: doc 2 as its own row (RoPE is relative, so its offset does not matter).
  alone = run(module, x[:, L:], text_info(np.ones((B, T - L))))
  np.testing.assert_allclose(packed[:, L:], alone, atol=1e-5)


def test_infini_document_starting_mid_segment_neither_reads_nor_leaks_memory():
  """Doc 2 starts at token 5, inside segment 0 (segments are aligned to the
  row): nothing of doc 1 reaches doc 2 through the memory or the local
  softmax, and doc 2 never changes doc 1 (causal, and per document)."""
  module = build('delta')
  x = jax.random.normal(jax.random.key(4), (B, T, 32))
  seg = np.ones((B, T), np.int32)
  seg[:, 5:] = 2
  base = run(module, x, text_info(seg))
  doc1_changed = run(module, x.at[:, :5].add(3.0), text_info(seg))
  np.testing.assert_array_equal(base[:, 5:], doc1_changed[:, 5:])
  assert float(jnp.abs(base[:, :5] - doc1_changed[:, :5]).max()) > 1e-2
  doc2_changed = run(module, x.at[:, 5:].add(3.0), text_info(seg))
  np.testing.assert_array_equal(base[:, :5], doc2_changed[:, :5])


def test_gate_has_own_learning_rate_and_no_weight_decay():
  params = {'w': jnp.ones((4, 4)), 'memory_gate': jnp.ones((3, 4))}   # stacked [layers, H]
  grads = jax.tree.map(jnp.ones_like, params)
  cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=1e9)
  cfg_model = ModelConfig(attention='infini', infini=InfiniConfig(gate_lr_mult=3.0))
  # The model declares the gate's group in its parameter metadata.
  groups = st.model_def(cfg_model).groups
  attn = lambda tree: tree['layers']['blocks'][0]['attn']
  assert attn(groups.lr_mult)['memory_gate'] == 3.0 and attn(groups.own_lr)['memory_gate']
  assert not attn(groups.weight_decay)['memory_gate']
  assert attn(groups.weight_decay)['wq_DxHxK'] and not attn(groups.own_lr)['wq_DxHxK']
  # The same groups on a two-leaf tree: a matrix and a stacked [layers, H] gate.
  pick = lambda tree: {'w': attn(tree)['wq_DxHxK'], 'memory_gate': attn(tree)['memory_gate']}
  plain = st.ParamGroups(weight_decay={'w': True, 'memory_gate': False},
                         lr_mult={'w': 1.0, 'memory_gate': 1.0},
                         own_lr={'w': False, 'memory_gate': False},
                         frozen={'w': False, 'memory_gate': False})
  mine = st.ParamGroups(*(pick(getattr(groups, f)) for f in
                          ('weight_decay', 'lr_mult', 'own_lr', 'frozen')))
  base, tx = st.make_optimizer(cfg, 10, plain), st.make_optimizer(cfg, 10, mine)
  u0, _ = base.update(grads, base.init(params), params)
  u1, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u1['w'], u0['w'], rtol=1e-6)
  # Adam's first step is -lr * sign(g); decay would add -lr * wd * p on top.
  lr = float(st.lr_schedule(cfg, 10)(0))
  np.testing.assert_allclose(u1['memory_gate'], -3.0 * lr * np.ones((3, 4)), rtol=1e-4)
  assert not any(jax.tree.leaves(st.model_def(ModelConfig()).groups.own_lr))
