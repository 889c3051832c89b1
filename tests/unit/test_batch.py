"""The batch contract as data: gemjax.batch.KEYS, empty_batch, patch_budgets."""

import os

import numpy as np
import pytest

from gemjax import batch as batch_lib
from gemjax.config import DataConfig, DatasetConfig, ModelConfig
from gemjax.data import pipeline
from gemjax.data.sequence import SequenceBuilder
from gemjax.parallel import layouts
from gemjax.tokenizers.text import ByteTokenizer

SAMPLE = os.path.join(os.path.dirname(__file__), '..', '..', 'data', 'sample', 'validation')
BUILDER = SequenceBuilder(ByteTokenizer())


def test_every_key_has_one_logical_axis_per_dimension():
  for key, spec in batch_lib.KEYS.items():
    assert len(batch_lib.logical_axes(key)) == spec.rank, key
    assert batch_lib.logical_axes(key)[0] == 'batch', key
  assert batch_lib.logical_axes('tokens') == ('batch', 'length')
  assert batch_lib.logical_axes('positions') == ('batch', 'length', None)
  assert batch_lib.logical_axes('image_patches') == ('batch', None, None)
  assert batch_lib.logical_axes('audio_slots') == ('batch', None)
  assert set(batch_lib.REQUIRED_KEYS) == {k for k, s in batch_lib.KEYS.items() if s.required}
  with pytest.raises(ValueError, match="'nonsense'"):
    batch_lib.logical_axes('nonsense')


def test_empty_batch_is_all_padding_and_passes_validate_batch():
  budgets, dims = {'image': 4, 'audio': 3}, {'image': 6, 'audio': 2}
  b = batch_lib.empty_batch(2, 8, budgets, dims, pad_id=7)
  batch_lib.validate_batch(b, where='empty_batch')
  assert set(b) == set(batch_lib.REQUIRED_KEYS) | {
      'image_patches', 'image_slots', 'audio_patches', 'audio_slots'}
  assert b['tokens'].shape == (2, 8) and b['positions'].shape == (2, 8, 3)
  assert np.all(b['tokens'] == 7) and np.all(b['targets'] == 7)
  assert not b['segment_ids'].any() and not b['loss_weights'].any()
  assert b['image_patches'].shape == (2, 4, 6) and not b['image_patches'].any()
  assert np.all(b['image_slots'] == -1) and b['audio_slots'].shape == (2, 3)
  row = batch_lib.empty_row(8, budgets, dims, pad_id=7)
  for k in b:
    np.testing.assert_array_equal(row[k], b[k][0], err_msg=k)
  with pytest.raises(ValueError, match="patch_dims\\['video'\\]"):
    batch_lib.empty_batch(1, 8, {'video': 2}, {})


def test_patch_budgets_and_dims_read_the_config_sections():
  d = DataConfig(image_patches=5, audio_patches=0, video_patches=2)
  assert batch_lib.patch_budgets(d) == {'image': 5, 'video': 2}
  m = ModelConfig(image_patch_dim=12, audio_patch_dim=8, video_patch_dim=0)
  assert batch_lib.patch_dims(m) == {'image': 12, 'audio': 8}


def test_every_key_of_a_pipeline_batch_is_in_the_contract():
  budgets = {'image': 64, 'audio': 48, 'video': 32}
  tasks = ('image_digit', 'speech_digit', 'video_digits', 'text_lm')
  settings = pipeline.DataSettings(
      datasets=tuple(DatasetConfig(os.path.join(SAMPLE, f'{t}-*')) for t in tasks),
      patch_budgets=budgets, patch_dims=BUILDER.patch_dims, read_threads=1)
  it = pipeline.make_train_iterator(settings, BUILDER, seq_len=256, batch_size=2, seed=0)
  batch = next(it)
  laid = layouts.apply_layout(batch, 'zigzag', 2)   # adds token_index
  assert layouts.TOKEN_INDEX_KEY in laid
  for b in (batch, laid):
    batch_lib.validate_batch(b)
    for key, value in b.items():
      assert len(batch_lib.logical_axes(key)) == np.ndim(value), key
