"""Packing and the Grain pipeline: exact packing, mixing, resume, process
sharding, bad-record policy, and real batches from the sample corpus."""

import collections
import json
import os
import re

import msgpack
import numpy as np
import pytest
from array_record.python import array_record_module

from gemjax import batch as batch_lib
from gemjax.config import DatasetConfig
from gemjax.data import packing, pipeline, records
from gemjax.data.sequence import SequenceBuilder
from gemjax.errors import BadInputError, ConfigError
from gemjax.tokenizers.text import ByteTokenizer

SAMPLE = os.path.join(os.path.dirname(__file__), '..', '..', 'data', 'sample')
BUILDER = SequenceBuilder(ByteTokenizer())
BOS = BUILDER.layout.bos

# ---------------------------------------------------------------- packing


def _synthetic_example(uid: int, length: int, counts: dict, rng) -> dict:
  """Tokens uid*10000 + i; patch j of modality m holds (uid, m, j)."""
  tokens = uid * 10000 + np.arange(length, dtype=np.int32)
  ex = {
      'tokens': tokens,
      'modality': np.zeros(length, np.int8),
      'positions': np.stack([tokens, tokens + 1, tokens + 2], -1).astype(np.int32),
      'block_ids': np.zeros(length, np.int32),
      'targets': tokens + 1,
      'loss_weights': rng.random(length).astype(np.float32),
  }
  free = list(rng.permutation(length))
  for b, (m, p) in enumerate(sorted(counts.items()), 1):
    slots = np.sort(np.array([free.pop() for _ in range(p)], np.int32))
    code = batch_lib.MODALITY_NAMES.index(m)
    ex['modality'][slots] = code
    ex['block_ids'][slots] = b
    ex[f'{m}_patches'] = np.stack([np.array([uid, code, j], np.float32) for j in range(p)])
    ex[f'{m}_slots'] = slots
  return ex


def _unpack(rows, spec):
  """Per uid: token index -> (row, column) for every token found in rows."""
  seen = collections.defaultdict(dict)
  for r, row in enumerate(rows):
    seg = row['segment_ids']
    n = int(seg.max())
    real = seg > 0
    # Segment ids are 1..n, contiguous, in order, then padding.
    assert np.all(seg[:real.sum()] > 0) and not np.any(seg[real.sum():])
    assert list(np.unique(seg[real])) == list(range(1, n + 1))
    assert np.all(np.diff(seg[real]) >= 0)
    for s in range(1, n + 1):
      cols = np.nonzero(seg == s)[0]
      uids = row['tokens'][cols] // 10000
      assert len(set(uids.tolist())) == 1, 'one example per segment'
      for c in cols:
        idx = int(row['tokens'][c] % 10000)
        assert idx not in seen[int(uids[0])], 'token packed twice'
        seen[int(uids[0])][idx] = (r, c)
    blocks = {}
    for c in np.nonzero(row['block_ids'])[0]:
      key = (int(row['tokens'][c] // 10000), int(row['modality'][c]))
      assert blocks.setdefault(int(row['block_ids'][c]), key) == key, 'block ids clash'
    for m in spec.modalities:
      pk, sk = batch_lib.patch_keys(m)
      used = row[sk] >= 0
      assert np.all(used[:used.sum()]) and used.sum() <= spec.patch_budgets[m]
      for patch, slot in zip(row[pk][used], row[sk][used]):
        uid, code, j = (int(v) for v in patch)
        assert row['tokens'][slot] // 10000 == uid
        assert row['modality'][slot] == code
        seen[uid].setdefault(('patch', m, j), slot)
  return seen


def test_packing_keeps_every_token_once_with_segments_positions_and_slots():
  rng = np.random.default_rng(0)
  spec = packing.PackSpec(64, {'image': 6, 'audio': 5}, {'image': 3, 'audio': 3})
  examples = []
  for uid in range(1, 120):
    kind = rng.integers(4)
    if kind == 0:    # long text, split across rows
      ex = _synthetic_example(uid, int(rng.integers(40, 200)), {}, rng)
    elif kind == 1:  # short text
      ex = _synthetic_example(uid, int(rng.integers(3, 30)), {}, rng)
    else:            # image and / or audio, never split
      counts = {'image': int(rng.integers(1, 7))}
      if kind == 3:
        counts['audio'] = int(rng.integers(1, 6))
      ex = _synthetic_example(uid, int(rng.integers(12, 50)), counts, rng)
    examples.append(ex)
  rows = packing.pack_examples(examples, spec, num_bins=4, min_split=8)
  seen = _unpack(rows, spec)
  for uid, ex in enumerate(examples, 1):
    L = len(ex['tokens'])
    assert sorted(k for k in seen[uid] if isinstance(k, int)) == list(range(L))
    for i in range(L):
      r, c = seen[uid][i]
      for key in packing.EXAMPLE_KEYS:
        if key != 'block_ids':
          np.testing.assert_array_equal(rows[r][key][c], ex[key][i], err_msg=key)
    for m in ('image', 'audio'):
      if f'{m}_slots' in ex:  # every patch once, at its own token, slot offset
        for j, s in enumerate(ex[f'{m}_slots']):
          slot = seen[uid][('patch', m, j)]
          r, c = seen[uid][int(s)]
          assert slot == c
      else:
        assert not any(k[:2] == ('patch', m) for k in seen[uid] if isinstance(k, tuple))
  # Multimodal examples are never split: all their tokens share one row.
  for uid, ex in enumerate(examples, 1):
    if np.any(ex['block_ids']):
      assert len({seen[uid][i][0] for i in range(len(ex['tokens']))}) == 1
  for row in rows:
    batch_lib.validate_batch({k: v[None] for k, v in row.items()
                              if k != packing.STATS_KEY}, where='row')
  assert sum(r[packing.STATS_KEY]['examples'] for r in rows) == len(examples)


def test_packing_drops_examples_over_budget_and_counts_bad_markers():
  rng = np.random.default_rng(1)
  spec = packing.PackSpec(32, {'image': 4}, {'image': 3})
  items = [
      _synthetic_example(1, 10, {'image': 2}, rng),
      _synthetic_example(2, 10, {'image': 5}, rng),   # more patches than a row holds
      _synthetic_example(3, 40, {'image': 1}, rng),   # longer than T, not splittable
      packing.bad_item('shard:7', BadInputError('image', 'shard:7', 'broken png')),
      _synthetic_example(4, 10, {'image': 3}, rng),   # 2 + 3 > 4: needs a new row
  ]
  rows = packing.pack_examples(items, spec, num_bins=4)
  stats = packing.batch_rows(rows)[packing.STATS_KEY]
  assert (stats['examples'], stats['dropped'], stats['bad']) == (2, 2, 1)
  assert stats['bad_where'] == ['shard:7 (image: broken png)']
  assert len(rows) == 2
  assert [int((r['image_slots'] >= 0).sum()) for r in rows] == [2, 3]


def test_text_packing_fills_rows():
  rng = np.random.default_rng(2)
  spec = packing.PackSpec(256)
  examples = [_synthetic_example(u, int(rng.integers(20, 700)), {}, rng) for u in range(1, 200)]
  rows = packing.pack_examples(examples, spec, num_bins=8, min_split=16)
  batch = packing.batch_rows(rows)
  # Every row but the last window's is at least 256 - min_split full.
  assert np.mean(batch['segment_ids'] > 0) >= 0.97


# ---------------------------------------------------------------- pipeline


def _text_record(name: str, i: int, rng) -> dict:
  body = 'x' * int(rng.integers(10, 60))
  return {'id': f'{name}{i:04d}', 'task': 'text', 'segments': [
      {'kind': 'text', 'text': f'{name}{i:04d}|{body}', 'predict': True}]}


@pytest.fixture(scope='module')
def text_shards(tmp_path_factory):
  """Two text datasets ('A': 120 records in 3 shards, 'B': 40 in 1)."""
  root = tmp_path_factory.mktemp('text')
  rng = np.random.default_rng(0)
  for name, n, shards in (('A', 120, 3), ('B', 40, 1)):
    records.write_shards([_text_record(name, i, rng) for i in range(n)],
                         str(root / name), shards)
  return root


def _settings(root, **kw):
  datasets = kw.pop('datasets', (DatasetConfig(str(root / 'A')),))
  return pipeline.DataSettings(datasets=datasets, read_threads=1, **kw)


def _headers(batch) -> list[str]:
  """The 'A0042' header after each bos: one per packed example."""
  out = []
  for row in batch['tokens']:
    for c in np.nonzero(row == BOS)[0]:
      out.append(bytes(row[c + 1:c + 6].astype(np.uint8).tolist()).decode())
  return out


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mixing_follows_the_weights(text_shards):
  settings = _settings(text_shards, datasets=(
      DatasetConfig(str(text_shards / 'A'), weight=3.0),
      DatasetConfig(str(text_shards / 'B'), weight=1.0)))
  it = pipeline.make_train_iterator(settings, BUILDER, seq_len=128, batch_size=4, seed=3)
  names = collections.Counter(h[0] for b in _take(it, 40) for h in _headers(b))
  share_a = names['A'] / (names['A'] + names['B'])
  assert sum(names.values()) > 300
  assert abs(share_a - 0.75) < 0.03, names


def test_batches_have_static_shapes_and_meet_the_contract(text_shards):
  settings = _settings(text_shards)
  it = pipeline.make_train_iterator(settings, BUILDER, seq_len=96, batch_size=3, seed=0)
  for batch in _take(it, 5):
    pipeline.check_batch(batch, settings, seq_len=96, batch_size=3)
    assert packing.STATS_KEY not in batch
  assert it.stats['packing_efficiency'] > 0.9


def test_resume_from_saved_state_gives_identical_batches(text_shards, tmp_path):
  from etils import epath
  from grain.checkpoint import CheckpointHandler

  # Two bins and small pieces: windows often end in the middle of an example,
  # the hardest state to resume from.
  settings = _settings(text_shards, pack_bins=2, min_split=4, datasets=(
      DatasetConfig(str(text_shards / 'A'), weight=2.0),
      DatasetConfig(str(text_shards / 'B'), weight=1.0)))
  make = lambda: pipeline.make_train_iterator(settings, BUILDER, seq_len=64,
                                              batch_size=2, seed=7)
  it = make()
  for _ in range(200):  # past an epoch of B, to a window that starts mid-example
    next(it)
    if it.get_state()['pipeline']['skip'] > 0 and it.stats['batches'] > 30:
      break
  state = json.loads(json.dumps(it.get_state()))
  assert state['pipeline']['skip'] > 0
  CheckpointHandler().save(epath.Path(tmp_path), item=it)
  expected = _take(it, 12)
  resumed = make()
  resumed.set_state(state)
  _same(_take(resumed, 12), expected)
  assert resumed.stats == it.stats
  restored = CheckpointHandler().restore(epath.Path(tmp_path), item=make())
  _same(_take(restored, 12), expected)
  # A different seed gives a different order.
  other = pipeline.make_train_iterator(settings, BUILDER, seq_len=64, batch_size=2, seed=8)
  assert _headers(next(other)) != _headers(next(make()))


def test_worker_processes_mix_every_dataset_and_resume_exactly(text_shards):
  settings = _settings(text_shards, num_workers=2, datasets=(
      DatasetConfig(str(text_shards / 'A'), weight=1.0),
      DatasetConfig(str(text_shards / 'B'), weight=1.0)))
  make = lambda: pipeline.make_train_iterator(settings, BUILDER, seq_len=64,
                                              batch_size=2, seed=1)
  it = make()
  try:
    first = _take(it, 6)
    state = it.get_state()
    expected = _take(it, 4)
  finally:
    it.close()
  # Each worker mixes both datasets (no aliasing of workers with the mix).
  mixed = [len({h[0] for h in _headers(b)}) == 2 for b in first + expected]
  assert sum(mixed) >= 8, mixed
  resumed = make()
  try:
    resumed.set_state(json.loads(json.dumps(state)))
    _same(_take(resumed, 4), expected)
  finally:
    resumed.close()


def test_state_from_another_worker_count_is_refused_naming_the_key(text_shards):
  # 1 -> 2 workers: Grain itself resumes silently from the wrong position.
  make = lambda w: pipeline.make_train_iterator(_settings(text_shards, num_workers=w),
                                                BUILDER, seq_len=64, batch_size=2)
  state = json.loads(json.dumps(make(1).get_state()))
  mismatch = r'saved with data\.num_workers=1, but this run sets data\.num_workers=2'
  with pytest.raises(ConfigError, match=mismatch):
    make(2).set_state(state)
  # States saved before the count was: the count is read off Grain's layout.
  del state['num_workers']
  with pytest.raises(ConfigError, match=mismatch):
    make(2).set_state(state)
  make(1).set_state(state)
  in_process = json.loads(json.dumps(make(0).get_state()))
  del in_process['num_workers']
  with pytest.raises(ConfigError, match=r'data\.num_workers=0, but .* data\.num_workers=2'):
    make(2).set_state(in_process)


def test_two_processes_see_disjoint_records(text_shards):
  settings = _settings(text_shards)
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(settings, BUILDER, seq_len=128, batch_size=2,
                                      seed=5, process_index=p, process_count=2)
    seen.append({h for b in _take(it, 30) for h in _headers(b)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f'A{i:04d}' for i in range(120)}


def _shard_with_bad_records(path: str) -> list[int]:
  """20 good text records with three bad ones; returns the bad indices."""
  rng = np.random.default_rng(4)
  w = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  bad = []
  for i in range(23):
    if i == 5:
      w.write(b'\x00 not msgpack')
    elif i == 11:  # a version this code does not read
      w.write(msgpack.packb({'format': records.FORMAT_NAME, 'version': 9,
                             'id': 'v9', 'task': 't', 'segments': []}))
    elif i == 17:  # decodes as a record, but the image is not an image
      w.write(records.encode_record({'id': 'img', 'task': 'caption', 'segments': [
          {'kind': 'image', 'data': b'\x89PNG broken', 'format': 'png'},
          {'kind': 'text', 'text': 'a cat', 'predict': True}]}))
    else:
      w.write(records.encode_record(_text_record('G', i, rng)))
      continue
    bad.append(i)
  w.close()
  return bad


def test_bad_records_are_skipped_counted_and_named(tmp_path):
  path = str(tmp_path / 'mixed.array_record')
  bad = _shard_with_bad_records(path)
  settings = _settings(tmp_path, datasets=(DatasetConfig(path),),
                       patch_budgets={'image': 8}, patch_dims=BUILDER.patch_dims)
  it = pipeline.make_eval_iterator(settings, BUILDER, seq_len=128, batch_size=2)
  headers = [h for b in it for h in _headers(b)]
  assert len(headers) == 20
  stats = it.stats
  assert (stats['bad'], stats['examples']) == (3, 20)
  wheres = sorted(stats['bad_where'], key=lambda w: int(w.split(' ')[0].split(':')[-1]))
  assert [w.split(' ')[0] for w in wheres] == [f'{path}:{i}' for i in bad]
  assert 'version 9' in ' '.join(wheres) and 'image' in wheres[2]


def test_strict_policy_raises_naming_source_and_index(tmp_path):
  path = str(tmp_path / 'mixed.array_record')
  bad = _shard_with_bad_records(path)
  settings = _settings(tmp_path, datasets=(DatasetConfig(path),),
                       bad_records='strict', patch_budgets={'image': 8},
                       patch_dims=BUILDER.patch_dims)
  it = pipeline.make_train_iterator(settings, BUILDER, seq_len=128, batch_size=2)
  with pytest.raises(BadInputError) as e:
    _take(it, 20)
  index = re.fullmatch(re.escape(path) + r':(\d+)', e.value.source.split(':segments')[0])
  assert index and int(index.group(1)) in bad


def test_eval_iterator_is_one_ordered_pass_with_a_padded_final_batch(text_shards):
  settings = _settings(text_shards, datasets=(DatasetConfig(str(text_shards / 'B')),))
  batches = list(pipeline.make_eval_iterator(settings, BUILDER, seq_len=128, batch_size=4))
  headers = [h for b in batches for h in _headers(b)]
  assert headers == [f'B{i:04d}' for i in range(40)]
  assert all(b['tokens'].shape == (4, 128) for b in batches)
  assert not batches[-1]['segment_ids'][-1].any()  # padding row


def test_sample_corpus_gives_valid_multimodal_batches():
  tasks = ('image_digit', 'speech_digit', 'same_digit', 'video_digits',
           'photo_caption', 'text_lm')
  budgets = {'image': 64, 'audio': 48, 'video': 32}
  settings = pipeline.DataSettings(
      datasets=tuple(DatasetConfig(os.path.join(SAMPLE, 'validation', f'{t}-*'))
                     for t in tasks),
      patch_budgets=budgets, patch_dims=BUILDER.patch_dims, read_threads=1)
  it = pipeline.make_train_iterator(settings, BUILDER, seq_len=256, batch_size=2, seed=0)
  seen = set()
  for batch in _take(it, 4):
    pipeline.check_batch(batch, settings, seq_len=256, batch_size=2)
    for m in budgets:
      slots = batch[f'{m}_slots']
      b_idx, p_idx = np.nonzero(slots >= 0)
      if len(b_idx):
        seen.add(m)
        # Each patch lands on a placeholder of its own modality.
        assert np.all(batch['modality'][b_idx, slots[b_idx, p_idx]] ==
                      batch_lib.MODALITY_NAMES.index(m))
  assert seen == set(budgets)
  assert it.stats['bad'] == 0 and it.stats['examples'] > 10
