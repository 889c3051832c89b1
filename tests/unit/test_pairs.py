"""Matching pairs composed on the fly (gemjax/data/pairs.py)."""

import io

import numpy as np
import pytest
from PIL import Image

from gemjax.data import records
from gemjax.data.pairs import MatchPairsSource
from gemjax.errors import ConfigError


def _png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


class ListSource:
  """What ArrayRecordSource returns, from records made in the test."""

  def __init__(self, name, recs):
    self.name, self.items = name, [records.encode_record(r) for r in recs]

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return {'where': f'{self.name}:{i}', 'record': self.items[i]}

  def __repr__(self):
    return self.name


def _media(kind, label, i, meta=True):
  return {'id': f'{kind}/{i}', 'task': kind,
          'segments': [{'kind': 'image', 'data': _png(i), 'format': 'png', 'predict': False},
                       {'kind': 'text', 'text': 'Which digit?', 'predict': False},
                       {'kind': 'text', 'text': str(label), 'predict': True}],
          'meta': {'digit': label} if meta else {}}


@pytest.fixture(scope='module')
def source():
  left = ListSource('left', [_media('a', i % 10, i) for i in range(30)])
  right = ListSource('right', [_media('b', i % 10, 100 + i) for i in range(20)])
  return MatchPairsSource(left, right, label_key='digit', prompt='Same?', seed=3,
                          task='same_digit')


def _decode(item):
  return records.decode_record(item['record'], item['where'])


def test_answer_agrees_with_labels_and_only_answer_is_predicted(source):
  assert len(source) == 30 * 20
  same = []
  for i in range(300):
    rec = _decode(source[i])
    meta = rec['meta']
    answer = rec['segments'][-1]
    assert answer['predict'] and not any(s['predict'] for s in rec['segments'][:-1])
    assert answer['text'] == ('yes' if meta['left_digit'] == meta['right_digit'] else 'no')
    assert [s['kind'] for s in rec['segments']] == ['image', 'image', 'text', 'text']
    assert rec['segments'][2]['text'] == 'Same?' and rec['task'] == 'same_digit'
    same.append(meta['same'])
  # Binomial(300, 1/2): 5 standard deviations is +-43.
  assert abs(sum(same) - 150) < 43


def test_pairs_are_a_pure_function_of_seed_and_index(source):
  again = MatchPairsSource(source.left, source.right, label_key='digit', prompt='Same?',
                           seed=3, task='same_digit')
  other = MatchPairsSource(source.left, source.right, label_key='digit', prompt='Same?',
                           seed=4, task='same_digit')
  assert [source[i]['record'] for i in range(20)] == [again[i]['record'] for i in range(20)]
  assert [source[i]['record'] for i in range(20)] != [other[i]['record'] for i in range(20)]


def test_missing_label_is_a_bad_record_naming_the_source():
  left = ListSource('left', [_media('a', 1, 0, meta=False)])
  right = ListSource('right', [_media('b', i, i) for i in range(3)])
  item = MatchPairsSource(left, right, label_key='digit', prompt='Same?')[0]
  assert 'record' not in item and item['error'][0] == 'record'
  assert "no label 'digit'" in item['error'][1] and 'left' in item['where']


def test_config_errors():
  left = ListSource('left', [_media('a', 1, 0)])
  with pytest.raises(ConfigError, match='needs a prompt'):
    MatchPairsSource(left, left, label_key='digit', prompt='')
  with pytest.raises(ConfigError, match='1 distinct .digit. labels'):
    MatchPairsSource(left, left, label_key='digit', prompt='Same?')[0]
