"""The train step on 8 emulated devices equals the 1-device step (f32, atol 1e-5)."""

import jax
import numpy as np
import pytest

from gemjax.config import load_config
from gemjax.data.registry import make_iterator
from gemjax.parallel import layouts
from gemjax.parallel import sharding as shd
from gemjax.train import state as S

TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=256', 'train.batch_size=8', 'train.seq_len=32']
ATOL = 1e-5  # f32 with matmul precision 'highest': sharded sums reorder adds only


def _one_step(mesh_sizes, extra=()):
  cfg = load_config(None, TINY + list(extra))
  mdef = S.model_def(cfg.model)
  tx = S.make_optimizer(cfg.optimizer, 10, mdef.groups)
  n = int(np.prod(list(mesh_sizes.values())))
  full = {a: 1 for a in shd.MESH_AXES} | mesh_sizes
  mesh = shd.make_mesh(full, devices=jax.devices()[:n])
  state = S.init_state(cfg.model, mdef, tx, mesh, seed=0)
  batch = next(make_iterator(cfg, 'train'))
  if mesh_sizes.get('context', 1) > 1:   # what the Trainer does (mesh.context_layout)
    batch = layouts.apply_layout(batch, cfg.mesh.context_layout, mesh_sizes['context'])
  bshards = S.batch_shardings(mesh, {k: v.ndim for k, v in batch.items()})

  def grads_fn(params, batch):
    return jax.value_and_grad(S.loss_fn, has_aux=True)(
        params, batch, graphdef=mdef.graphdef, z_loss=cfg.model.z_loss)

  with shd.use_mesh(mesh):
    fn = jax.jit(grads_fn, in_shardings=(S.param_shardings(mdef, mesh), bshards))
    (loss, _), grads = fn(state['params'], S.to_global(batch, bshards))
  return float(loss), jax.tree.map(np.asarray, grads), state['params']


@pytest.fixture(scope='module')
def reference():
  return _one_step({})


@pytest.mark.parametrize('mesh_sizes,extra', [
    ({'data': 8}, ()), ({'fsdp': 8}, ()), ({'data': 2, 'fsdp': 2, 'tensor': 2}, ()),
    # Ring attention over 'context' on zigzag-laid-out rows vs the unpermuted 1-device step.
    ({'data': 2, 'context': 4}, ('model.attention=ring', 'model.attention_block=4'))],
    ids=['data8', 'fsdp8', 'data2_fsdp2_tensor2', 'data2_context4_ring_zigzag'])
def test_sharded_loss_and_grads_match_single_device(reference, mesh_sizes, extra):
  ref_loss, ref_grads, _ = reference
  loss, grads, params = _one_step(mesh_sizes, extra)
  assert abs(loss - ref_loss) <= ATOL
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  for path, g_ref in flat_ref:
    np.testing.assert_allclose(flat[path], g_ref, atol=ATOL, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  # The parameters really are split as the logical-axis table says.
  if 'fsdp' in mesh_sizes:
    wq = params['layers']['blocks'][0]['attn']['wq_DxHxK']
    assert 'fsdp' in str(wq.sharding.spec)
    assert wq.addressable_shards[0].data.shape[1] == 32 // mesh_sizes['fsdp']
