"""FSQ image tokenizer: quantiser maths, shapes, files, errors, shipped checkpoint.

Tiny configs (8px images, 12 codes) keep compiles to a second or two; one
module-scoped tokenizer is shared so each batch shape compiles once.
"""

import json
import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemjax.errors import BadInputError, CheckpointError, ConfigError
from gemjax.tokenizers import image_codes as ic

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = REPO / 'data' / 'sample' / 'image_codes'
TEST_DIGITS = str(REPO / 'data' / 'sample' / 'test' / 'image_digit-*')

# Odd and even levels together: the even one exercises the half-offset.
TINY = ic.ImageCodeConfig(image_size=8, channels=1, levels=(3, 4), downsample=2,
                          widths=(4, 4))


@pytest.fixture(scope='module')
def tiny():
  return ic.ImageCodeTokenizer.init(TINY, seed=0)


def test_config_num_codes_grid_and_presets():
  assert ic.PRESETS['digits28'].num_codes == 1000
  assert ic.PRESETS['digits28'].grid == (7, 7)
  assert ic.PRESETS['tpu256'].grid == (16, 16) and ic.PRESETS['tpu256'].channels == 3
  assert ic.PRESETS['tpu512'].grid == (32, 32)
  assert TINY.num_codes == 12 and TINY.grid == (4, 4)


@pytest.mark.parametrize('kwargs, key', [
    (dict(downsample=3), 'downsample'),
    (dict(image_size=30), 'image_size'),
    (dict(levels=(8, 1)), 'levels'),
    (dict(channels=2), 'channels'),
    (dict(widths=(16, 32)), 'widths'),
])
def test_config_errors_name_the_key(kwargs, key):
  with pytest.raises(ConfigError, match=f'ImageCodeConfig.{key}='):
    ic.ImageCodeConfig(**kwargs)


def test_fsq_indices_codes_round_trip_is_exact_for_every_index():
  fsq = ic.FSQ((8, 5, 5, 5))
  idx = jnp.arange(fsq.num_codes, dtype=jnp.int32)
  codes = fsq.indices_to_codes(idx)
  assert float(jnp.abs(codes).max()) <= 1.0
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(codes)), np.arange(1000))
  # Every code is a fixed point of quantize's forward pass, so an encoder can
  # land on all 1000 (no unreachable ids).
  hw = jnp.asarray([4., 2., 2., 2.])
  z = jnp.arctanh((codes * hw + jnp.asarray(fsq._offset, jnp.float32))
                  / jnp.asarray(fsq._half_l, jnp.float32)) - jnp.asarray(fsq._shift, jnp.float32)
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(fsq.quantize(z))),
                                np.arange(1000))


def test_fsq_forward_takes_exactly_levels_values_per_dim():
  fsq = ic.FSQ((8, 5, 4, 3))
  z = jnp.linspace(-20, 20, 4001)[:, None] * jnp.ones((1, 4))
  q = np.asarray(fsq.quantize(z))
  for d, l in enumerate(fsq.levels):
    assert len(np.unique(q[:, d])) == l, (d, l, np.unique(q[:, d]))


def test_fsq_straight_through_gradient_is_c_times_tanh_bound_derivative():
  fsq = ic.FSQ((8, 5, 5, 5))
  z = jax.random.normal(jax.random.PRNGKey(0), (64, 4)) * 1.5
  c = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
  g = jax.grad(lambda z: jnp.sum(fsq.quantize(z) * c))(z)
  # Rounding passes gradients through unchanged; what remains is the bound
  # tanh(z + shift) * half_l - offset, divided by L // 2.
  shift = np.arctanh(fsq._offset / fsq._half_l)
  want = c * fsq._half_l * (1 - np.tanh(np.asarray(z) + shift) ** 2) / fsq._half_width
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(fsq.bound_grad(z)) / fsq._half_width,
                             want / np.asarray(c), rtol=1e-5, atol=1e-6)


def test_encode_decode_shapes_and_id_range(tiny):
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, (5, 8, 8), np.uint8)
  codes = tiny.encode(batch)
  assert codes.shape == (5, 4, 4) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < tiny.num_codes
  one = tiny.encode(batch[0])
  assert one.shape == (4, 4)
  np.testing.assert_array_equal(one, codes[0])   # padding a batch changes nothing
  assert tiny.encode(batch[..., None]).shape == (5, 4, 4)
  assert tiny.encode(batch[0, :, :, None]).shape == (4, 4)
  np.testing.assert_array_equal(tiny.encode(batch / 255.0), codes)  # floats in [0, 1]
  # Other sizes are resized, RGB is converted to grey.
  assert tiny.encode(rng.integers(0, 256, (2, 16, 12, 3), np.uint8)).shape == (2, 4, 4)
  images = tiny.decode(codes)
  assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
  assert tiny.decode(codes[0]).shape == (8, 8, 1)
  all_ids = np.arange(12, dtype=np.int64).reshape(3, 4)[None].repeat(1, 0)
  assert tiny.decode(np.concatenate([all_ids, all_ids[:, :1]], 1)).shape == (1, 8, 8, 1)


def test_bad_inputs_raise_errors_naming_shape_dtype_or_range(tiny):
  with pytest.raises(BadInputError, match=r'int64'):
    tiny.encode(np.zeros((8, 8), np.int64))
  with pytest.raises(BadInputError, match=r'\(2, 2, 8, 8, 1\)'):
    tiny.encode(np.zeros((2, 2, 8, 8, 1), np.uint8))
  with pytest.raises(BadInputError, match=r'\[0, 1\]'):
    tiny.encode(np.full((8, 8), 2.0, np.float32))
  with pytest.raises(ValueError, match=r'\[0, 12\)'):
    tiny.decode(np.full((4, 4), 12))
  with pytest.raises(ValueError, match=r'\[0, 12\)'):
    tiny.decode(np.full((4, 4), -1))
  with pytest.raises(ValueError, match=r'\[4, 4\]'):
    tiny.decode(np.zeros((3, 4), np.int32))


def test_save_load_round_trip_gives_identical_codes(tiny, tmp_path):
  rng = np.random.default_rng(1)
  batch = rng.integers(0, 256, (3, 8, 8), np.uint8)
  tiny.save(str(tmp_path))
  meta = json.loads((tmp_path / 'config.json').read_text())
  assert meta['format_version'] == ic.FORMAT_VERSION
  loaded = ic.ImageCodeTokenizer.load(str(tmp_path))
  assert loaded.config == TINY
  np.testing.assert_array_equal(loaded.encode(batch), tiny.encode(batch))


def test_pickled_tokenizer_encodes_identically(tiny):
  # Grain worker processes get the tokenizer by pickling.
  batch = np.random.default_rng(2).integers(0, 256, (3, 8, 8), np.uint8)
  clone = pickle.loads(pickle.dumps(tiny))
  np.testing.assert_array_equal(clone.encode(batch), tiny.encode(batch))


def test_load_errors_name_the_path(tiny, tmp_path):
  with pytest.raises(CheckpointError, match='config.json'):
    ic.ImageCodeTokenizer.load(str(tmp_path / 'nowhere'))
  tiny.save(str(tmp_path))
  (tmp_path / 'params.npz').write_bytes(b'not a zip')
  with pytest.raises(CheckpointError, match=str(tmp_path / 'params.npz')):
    ic.ImageCodeTokenizer.load(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"format_version": 99}')
  with pytest.raises(CheckpointError, match='format_version 99'):
    ic.ImageCodeTokenizer.load(str(tmp_path))
  (tmp_path / 'config.json').write_text('{broken')
  with pytest.raises(CheckpointError, match='not valid JSON'):
    ic.ImageCodeTokenizer.load(str(tmp_path))


def test_train_lowers_the_loss_on_tiny_data():
  rng = np.random.default_rng(0)
  images = (rng.random((16, 8, 8)) > 0.5).astype(np.uint8) * 255
  tok, hist = ic.train(TINY, images, steps=30, batch_size=8, learning_rate=1e-2, seed=0,
                       log_every=5)
  assert hist['loss'][-1] < hist['loss'][0]
  assert tok.encode(images).shape == (16, 4, 4)


def test_record_format_constants_match_the_data_room():
  from gemjax.data import records
  assert ic.RECORD_FORMAT_NAME == records.FORMAT_NAME
  assert tuple(ic.RECORD_VERSIONS) == tuple(records.SUPPORTED_VERSIONS)


def test_ssim_matches_scikit_image():
  metrics = pytest.importorskip('skimage.metrics')
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (2, 20, 20, 3), np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
  want = np.mean([metrics.structural_similarity(x, y, channel_axis=-1, data_range=255)
                  for x, y in zip(a, b)])
  assert abs(ic.ssim(a, b) - want) < 1e-9


def test_shipped_checkpoint_reconstructs_test_digits():
  tok = ic.ImageCodeTokenizer.load(str(SHIPPED))
  assert tok.config == ic.PRESETS['digits28']
  assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 1_000_000
  images, metas = ic.read_images(TEST_DIGITS)
  assert images.shape == (181, 28, 28) and 'digit' in metas[0]
  m = ic.evaluate(tok, images)
  # Measured 32.71 dB and SSIM 0.9854 on these 181 digits (bench/image_codes.py,
  # 2-core CPU). The bars sit ~1.2 dB / 0.015 under that, so another CPU's float
  # rounding (a few flipped codes) cannot fail them, while a broken load (wrong
  # weights, layout or normalisation) lands far below: the untrained model
  # scores 7.3 dB.
  assert m['psnr'] > 31.5, m
  assert m['ssim'] > 0.97, m
  assert m['codes_used'] > 300, m   # measured 655: no collapse onto a few codes
