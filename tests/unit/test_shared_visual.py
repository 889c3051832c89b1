"""model.share_visual_embedder: video frames through the image patch embedder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemjax import config as config_lib
from gemjax.batch import MODALITY_NAMES
from gemjax.errors import ConfigError
from gemjax.model.info import SequenceInfo
from gemjax.model.spec import embedder_spec


def _model_cfg(**kw):
  return config_lib.ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=8, mlp_dim=32, image_patch_dim=12,
                                video_patch_dim=12, audio_patch_dim=8, **kw)


def _embed(share: bool, modality: str, patches_1xPxD):
  emb = embedder_spec(_model_cfg(share_visual_embedder=share)).build(nnx.Rngs(0))
  B, P, _ = patches_1xPxD.shape
  T = P + 2
  code = MODALITY_NAMES.index(modality)
  mod = np.zeros((B, T), np.int32)
  mod[:, 1:P + 1] = code
  batch = {'tokens': jnp.zeros((B, T), jnp.int32), 'modality': jnp.asarray(mod),
           f'{modality}_patches': patches_1xPxD,
           f'{modality}_slots': jnp.arange(1, P + 1, dtype=jnp.int32)[None]}
  info = SequenceInfo(positions_BxTx3=jnp.zeros((B, T, 3), jnp.int32),
                      segment_ids_BxT=jnp.ones((B, T), jnp.int32),
                      block_ids_BxT=jnp.asarray((mod > 0).astype(np.int32)),
                      index_BxT=jnp.arange(T, dtype=jnp.int32)[None],
                      modality_BxT=jnp.asarray(mod))
  table = jnp.zeros((64, 16))
  return emb, emb(table, batch, info)


def test_video_frames_use_the_image_embedder():
  patches = jax.random.normal(jax.random.key(1), (1, 3, 12))
  shared, x_video = _embed(True, 'video', patches)
  _, x_image = _embed(True, 'image', patches)
  assert sorted(shared.encoders.keys()) == ['audio', 'image']   # no video weights
  # Same weights, same patches: same embeddings (the modality table is constant zero).
  np.testing.assert_allclose(x_video[:, 1:4], x_image[:, 1:4], atol=1e-6)
  separate, _ = _embed(False, 'video', patches)
  assert sorted(separate.encoders.keys()) == ['audio', 'image', 'video']


def test_sizes_must_match():
  cfg = config_lib.Config(model=_model_cfg(share_visual_embedder=True))
  cfg.model.video_patch_dim = 24
  with pytest.raises(ConfigError, match='share_visual_embedder'):
    config_lib.validate(cfg)
