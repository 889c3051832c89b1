"""Model side of native multimodality: scatter into slots, M-RoPE, mask, fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemjax.config import load_config
from gemjax.batch import IMAGE, AUDIO, text_batch
from gemjax.kernels import dense_attention, visible_mask
from gemjax.model.embed import gather_slots, scatter_slots
from gemjax.model.info import SequenceInfo
from gemjax.model.rope import apply_rope
from gemjax.parallel import sharding as shd
from gemjax.train import state as S

SMALL = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4', 'model.num_kv_heads=2',
         'model.head_dim=8', 'model.mlp_dim=64', 'model.vocab_size=300',
         'model.image_patch_dim=12', 'model.audio_patch_dim=8', 'model.video_patch_dim=0',
         'train.batch_size=2', 'train.seq_len=24']


def test_scatter_places_each_patch_in_its_slot_and_drops_padding():
  x = jnp.zeros((2, 6, 3))
  emb = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3) + 1
  slots = jnp.array([[1, 4, -1], [0, -1, -1]])
  y = np.asarray(scatter_slots(x, emb, slots))
  np.testing.assert_array_equal(y[0, 1], emb[0, 0])
  np.testing.assert_array_equal(y[0, 4], emb[0, 1])
  np.testing.assert_array_equal(y[1, 0], emb[1, 0])
  assert np.count_nonzero(y.sum(-1)) == 3   # the padding patches went nowhere
  g = np.asarray(gather_slots(jnp.arange(12).reshape(2, 6), slots, fill=-7))
  np.testing.assert_array_equal(g, [[1, 4, -7], [6, -7, -7]])


def test_mrope_equals_1d_rope_on_text():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 10, 3, 16)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 50, size=(2, 10)), jnp.int32)
  pos3 = jnp.repeat(pos[..., None], 3, axis=-1)
  m = apply_rope(x, pos3, base=10_000.0, sections=(2, 1, 1))
  one_d = apply_rope(x, pos3, base=10_000.0, sections=(1, 0, 0))   # all pairs on t
  np.testing.assert_allclose(m, one_d, atol=1e-6)
  # Independent formula for 1D RoPE (rotate-half pairing).
  inv = 1.0 / (10_000.0 ** (np.arange(0, 16, 2) / 16))
  ang = np.asarray(pos)[..., None, None] * inv
  x1, x2 = np.asarray(x)[..., :8], np.asarray(x)[..., 8:]
  ref = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
  np.testing.assert_allclose(one_d, ref, atol=1e-5)
  # With h != w on an image the sections matter.
  pos_img = pos3.at[..., 1].add(3)
  assert not np.allclose(apply_rope(x, pos_img, base=1e4, sections=(2, 1, 1)), m)


def test_mask_image_tokens_see_each_other_but_never_a_later_segment():
  # tokens: 0 text, 1-3 image block 1, 4 text, | 5-6 next document (segment 2)
  seg = jnp.array([[1, 1, 1, 1, 1, 2, 2]])
  blk = jnp.array([[0, 1, 1, 1, 0, 0, 0]])
  idx = jnp.arange(7)[None]
  mask = np.asarray(visible_mask(seg, seg, blk, blk, idx, idx, causal=True, window=0))[0]
  assert mask[1, 3] and mask[3, 1]          # bidirectional inside the image
  assert not mask[0, 1]                     # text before the image does not see it
  assert mask[4, 1] and mask[4, 3]          # text after sees the whole image
  assert not mask[4, 5] and not mask[5, 4]  # segments never mix
  assert not mask[1, 4]                     # image does not see later text
  # And the kernel applies it: a change in a later segment leaves outputs alone.
  info = SequenceInfo(jnp.zeros((1, 7, 3), jnp.int32), seg, blk, idx, jnp.zeros((1, 7), jnp.int8))
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 7, 2, 4)), jnp.float32) for _ in range(3))
  out1 = dense_attention(q, k, v, info)
  out2 = dense_attention(q, k.at[:, 5:].add(3.0), v.at[:, 5:].add(3.0), info)
  np.testing.assert_allclose(out1[:, :5], out2[:, :5], atol=1e-6)
  out3 = dense_attention(q, k, v.at[:, 3].add(5.0), info)    # last image token
  assert not np.allclose(out3[:, 1], out1[:, 1])             # first image token sees it


def _mixed_batch(cfg, rng):
  B, T = cfg.train.batch_size, cfg.train.seq_len
  b = text_batch(rng.integers(0, 256, size=(B, T)))
  # Row r: image block at 2..5 (4 patches), audio block at 10..12 (3 patches).
  b['modality'][:, 2:6] = IMAGE
  b['modality'][:, 10:13] = AUDIO
  b['block_ids'][:, 2:6] = 1
  b['block_ids'][:, 10:13] = 2
  b['loss_weights'][:, 1:6] = 0
  b['loss_weights'][:, 9:13] = 0
  b['image_patches'] = rng.normal(size=(B, 5, 12)).astype(np.float32)
  b['image_slots'] = np.array([[2, 3, 4, 5, -1]] * B, np.int32)
  b['audio_patches'] = rng.normal(size=(B, 3, 8)).astype(np.float32)
  b['audio_slots'] = np.array([[10, 11, 12]] * B, np.int32)
  return b


@pytest.mark.slow
@pytest.mark.parametrize('encoder_layers', [0, 1], ids=['early_fusion', 'late_fusion'])
def test_fusion_model_trains_a_step_on_a_mixed_batch(encoder_layers):
  cfg = load_config(None, SMALL + [f'model.encoder_layers={encoder_layers}'])
  mdef = S.model_def(cfg.model)
  tx = S.optimizer_for(cfg)
  mesh = shd.make_mesh({a: 1 for a in shd.MESH_AXES}, devices=jax.devices()[:1])
  state = S.init_state(cfg.model, mdef, tx, mesh, 0)
  batch = _mixed_batch(cfg, np.random.default_rng(0))
  bs = S.batch_shardings(mesh, {k: v.ndim for k, v in batch.items()})
  step = S.jit_train_step(S.make_train_step(mdef, tx, cfg.model, S.lr_schedule(cfg.optimizer, 10)),
                          S.state_shardings(mdef, tx, mesh), bs)
  params0 = jax.tree.map(np.asarray, state['params'])
  with shd.use_mesh(mesh):
    for _ in range(2):   # the first step has learning rate 0 (warmup)
      state, m = step(state, S.to_global(batch, bs))
  assert np.isfinite(float(m['loss']))
  enc = state['params']['inputs']['encoders']
  assert set(enc) == {'image', 'audio', 'video'} - {'video'}
  # The patch embedders received gradient (the patches reach the loss).
  moved = np.abs(np.asarray(enc['image']['proj_PxD']) - params0['inputs']['encoders']['image']['proj_PxD'])
  assert moved.max() > 0
  if encoder_layers:
    assert 'blocks' in enc['image'] and len(enc['image']['blocks']) == 1
  # Changing the image patches changes the text predictions after the image only.
  eval_fn = jax.jit(lambda p, b: jax.nn.log_softmax(
      __import__('flax').nnx.merge(mdef.graphdef, p)(b)[0]))
  with shd.use_mesh(mesh):
    a = np.asarray(eval_fn(state['params'], S.to_global(batch, bs)))
    batch2 = dict(batch, image_patches=batch['image_patches'] + 1.0)
    b2 = np.asarray(eval_fn(state['params'], S.to_global(batch2, bs)))
  np.testing.assert_allclose(a[:, :2], b2[:, :2], atol=1e-5)
  assert not np.allclose(a[:, 6:], b2[:, 6:], atol=1e-4)


@pytest.mark.slow
def test_frozen_encoder_gets_no_update():
  cfg = load_config(None, SMALL + ['model.encoder_layers=1', 'model.freeze_encoder=true',
                                   'optimizer.warmup_steps=0'])
  mdef = S.model_def(cfg.model)
  tx = S.optimizer_for(cfg)
  params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), mdef.abstract_params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  enc = updates['inputs']['encoders']
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(enc))
  assert float(jnp.abs(updates['embedding_VxD']).max()) > 0
