"""Augmentation inside the pipeline: the builder hook (gemjax/data/sequence.py),
the per-record coin and generator (gemjax/data/augment.py RecordAugment), and
training-only use (gemjax/data/pipeline.py)."""

import numpy as np
import pytest

from gemjax.config import DatasetConfig
from gemjax.data import augment, pipeline, records, sources
from gemjax.data.sequence import SequenceBuilder
from gemjax.tokenizers.text import ByteTokenizer

SAMPLE = 'data/sample/test'


@pytest.fixture(scope='module')
def builder():
  return SequenceBuilder(ByteTokenizer(), media_cache_mb=16)


def _record(task, i=0):
  src = sources.open_source('auto', f'{SAMPLE}/{task}-*')
  return records.decode_record(src[i]['record'], f'{task}:{i}')


@pytest.mark.parametrize('task,key', [('image_digit', 'image_patches'),
                                      ('speech_digit', 'audio_patches'),
                                      ('video_digits', 'video_patches')])
def test_augmented_media_change_only_their_patches(builder, task, key):
  rec = _record(task)
  plain = builder.build(rec, 'r')
  again = builder.build(rec, 'r', augment=augment.RecordAugment(
      np.random.default_rng(0)))                       # p = 0: nothing changes
  for k in plain:
    np.testing.assert_array_equal(plain[k], again[k], err_msg=k)
  aug = lambda seed: builder.build(rec, 'r', augment=augment.RecordAugment(
      np.random.default_rng(seed), image_p=1.0, audio_p=1.0))
  a, b, c = aug(1), aug(1), aug(2)
  d = aug(1)   # decoded media from the cache (admitted on second sight), augmented afresh
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)   # a pure function of the generator
    np.testing.assert_array_equal(a[k], d[k], err_msg=k)
  assert not np.array_equal(a[key], c[key])
  if task != 'speech_digit':   # audio speed changes the clip's length; pixels never change the layout
    np.testing.assert_array_equal(a['tokens'], plain['tokens'])
    assert a[key].shape == plain[key].shape and not np.allclose(a[key], plain[key])
  else:
    assert a['tokens'][-3:].tolist() == plain['tokens'][-3:].tolist()   # same answer
  # The cache still holds the unaugmented tokens.
  np.testing.assert_array_equal(builder.build(rec, 'r')[key], plain[key])


def test_augmentation_is_per_stream_position_and_training_only(builder):
  ds = DatasetConfig(path=f'{SAMPLE}/image_digit-*', augment_image=1.0)
  decode = pipeline.DecodeAndBuild(builder, strict=True, augment_image=1.0, seed=0,
                                   stream=(0, 0))
  assert decode.uses_index
  src = pipeline.open_dataset(ds)
  x5, y5, x6 = decode.with_index(5, src[0]), decode.with_index(5, src[0]), decode.with_index(6, src[0])
  np.testing.assert_array_equal(x5['image_patches'], y5['image_patches'])
  assert not np.array_equal(x5['image_patches'], x6['image_patches'])

  def first(train, d=ds):
    s = pipeline.DataSettings(datasets=(d,), patch_budgets={'image': 64}, shuffle=False)
    it = iter(pipeline.build_dataset(s, builder, seq_len=128, batch_size=2, train=train))
    return next(it)
  plain = DatasetConfig(path=ds.path)
  np.testing.assert_array_equal(first(False)['image_patches'], first(False, plain)['image_patches'])
  assert not np.allclose(first(True)['image_patches'], first(True, plain)['image_patches'])


def test_dataset_loss_weight_scales_its_predicted_tokens_in_training_only(builder):
  ds = DatasetConfig(path=f'{SAMPLE}/image_digit-*', loss_weight=2.5)
  plain = DatasetConfig(path=ds.path)

  def first(d, train):
    s = pipeline.DataSettings(datasets=(d,), patch_budgets={'image': 64}, shuffle=False)
    return next(iter(pipeline.build_dataset(s, builder, seq_len=128, batch_size=2,
                                            train=train)))
  w, w0 = first(ds, True)['loss_weights'], first(plain, True)['loss_weights']
  assert w0.max() > 0
  np.testing.assert_array_equal(w, w0 * np.float32(2.5))
  np.testing.assert_array_equal(first(ds, False)['loss_weights'],
                                first(plain, False)['loss_weights'])


@pytest.mark.parametrize('key,bad', [('augment_image', '1.5'), ('augment_audio', '-0.1'),
                                     ('loss_weight', '0'), ('loss_weight', 'nan')])
def test_config_names_a_bad_per_dataset_training_setting(key, bad):
  from gemjax.config import load_config
  from gemjax.errors import ConfigError
  with pytest.raises(ConfigError, match=rf'data.datasets\[1\].{key}='):
    load_config('configs/nano.yaml', [f'data.datasets.1.{key}={bad}'])


def test_blas_threads_is_validated_and_caps_numpys_blas_pool():
  import threadpoolctl
  from gemjax.config import load_config
  from gemjax.data import registry
  from gemjax.errors import ConfigError
  with pytest.raises(ConfigError, match=r'data.blas_threads=-1'):
    load_config('configs/nano.yaml', ['data.blas_threads=-1'])
  blas = lambda: [p['num_threads'] for p in threadpoolctl.threadpool_info()
                  if p['user_api'] == 'blas']
  before = blas()
  try:
    registry.limit_blas_threads(1)
    assert blas() and all(n == 1 for n in blas())
  finally:
    threadpoolctl.threadpool_limits(limits=max(before), user_api='blas')
