"""Decoder structure: scan keeps the program size flat in depth; remat is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemjax.config import load_config
from gemjax.data.registry import make_iterator
from gemjax.train import state as S

TINY = ['model.d_model=32', 'model.num_heads=4', 'model.num_kv_heads=2', 'model.head_dim=8',
        'model.mlp_dim=64', 'model.vocab_size=256', 'train.batch_size=2', 'train.seq_len=16']


def _loss_and_grads(extra):
  cfg = load_config(None, TINY + extra)
  mdef = S.model_def(cfg.model)
  params = S.init_state(cfg.model, mdef, S.optimizer_for(cfg), _mesh(), 0)['params']
  batch = next(make_iterator(cfg, 'train'))
  fn = jax.jit(jax.value_and_grad(lambda p, b: S.loss_fn(p, b, graphdef=mdef.graphdef,
                                                         z_loss=cfg.model.z_loss)[0]))
  return fn, params, batch


def _mesh():
  from gemjax.parallel import sharding as shd
  return shd.single_device_mesh()


def test_scanned_program_size_does_not_grow_with_depth():
  sizes = {}
  for layers in (2, 16):
    fn, params, batch = _loss_and_grads([f'model.num_layers={layers}'])
    sizes[layers] = len(fn.lower(params, batch).as_text())
  # Same program, only the loop trip count and parameter shapes change.
  assert abs(sizes[16] - sizes[2]) / sizes[2] < 0.02, sizes


@pytest.mark.slow
@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch'])
def test_remat_policies_give_the_same_loss_and_grads(policy):
  fn, params, batch = _loss_and_grads(['model.num_layers=2'])
  loss, grads = fn(params, batch)
  fn_r, _, _ = _loss_and_grads(['model.num_layers=2', f'model.remat={policy}'])
  loss_r, grads_r = fn_r(params, batch)
  assert abs(float(loss) - float(loss_r)) < 1e-6
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_unscanned_and_untied_variants_match_or_run():
  fn, params, batch = _loss_and_grads(['model.num_layers=2'])
  fn_u, _, _ = _loss_and_grads(['model.num_layers=2', 'model.scan_layers=false'])
  np.testing.assert_allclose(float(fn(params, batch)[0]), float(fn_u(params, batch)[0]), atol=1e-6)
  fn_t, params_t, batch_t = _loss_and_grads(['model.num_layers=2', 'model.tie_embeddings=false'])
  assert 'head_DxV' in params_t
  loss, _ = fn_t(params_t, batch_t)
  assert np.isfinite(float(loss))


def test_weight_decay_skips_stacked_norm_scales():
  """Scanned layers stack a norm scale into [layers, D]: still not decayed."""
  import optax
  from gemjax.config import OptimizerConfig
  from gemjax.train.state import make_optimizer
  mdef = S.model_def(load_config(None, TINY + ['model.num_layers=3']).model)
  params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), mdef.abstract_params)
  assert params['layers']['blocks'][0]['attn_norm']['scale'].shape == (3, 32)
  tx = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5,
                                      clip_norm=1e9), 10, mdef.groups)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['layers']['blocks'][0]['attn_norm']['scale'], 1.0)
  np.testing.assert_array_equal(new['final_norm']['scale'], 1.0)
  assert float(new['layers']['blocks'][0]['mlp']['w_up_DxF'].max()) < 1.0   # matrices decay


@pytest.mark.slow
@pytest.mark.parametrize('tied', [True, False])
def test_chunked_loss_equals_the_whole_logits_loss_and_grads(tied):
  """model.loss_chunk: head + loss over 4-token chunks (rematerialised) give
  the loss, every metric and the gradients of the all-at-once path."""
  extra = ['model.num_layers=2', f'model.tie_embeddings={str(tied).lower()}']
  cfg = load_config(None, TINY + extra)
  mdef = S.model_def(cfg.model)
  params = S.init_state(cfg.model, mdef, S.optimizer_for(cfg), _mesh(), 0)['params']
  batch = next(make_iterator(cfg, 'train'))
  # Weights that differ by token and a modality change, so every sum is exercised.
  batch['loss_weights'] = np.asarray(batch['loss_weights']) * np.linspace(0.5, 1.5, 16)
  batch['modality'] = np.asarray(batch['modality']).copy()
  batch['modality'][:, 9:12] = 4

  def run(chunk):
    f = lambda p: S.loss_fn(p, batch, graphdef=mdef.graphdef, z_loss=1e-2, loss_chunk=chunk)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (loss, metrics), grads = run(0)
  (loss_c, metrics_c), grads_c = run(4)
  np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-6)
  assert set(metrics_c) == set(metrics)
  for k in metrics:
    np.testing.assert_allclose(np.asarray(metrics_c[k]), np.asarray(metrics[k]), rtol=1e-5,
                               atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(Exception, match='model.loss_chunk'):
    load_config(None, TINY + ['model.loss_chunk=5'])
