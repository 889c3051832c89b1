"""Record format, shard writer, sources (ArrayRecord, folder, JSONL, TFDS),
and the bundled sample corpus."""

import base64
import collections
import io
import json
import os

import msgpack
import numpy as np
import pytest
from array_record.python import array_record_module

from gemjax.data import __main__ as data_cli
from gemjax.data import records, sources
from gemjax.errors import BadInputError

SAMPLE = os.path.join(os.path.dirname(__file__), '..', '..', 'data', 'sample')


def _png(value: int = 128, size: int = 14) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def _record(i: int, task: str = 'caption') -> dict:
  return {'id': f'r{i}', 'task': task, 'segments': [
      {'kind': 'image', 'data': _png(i % 256), 'format': 'png', 'predict': False},
      {'kind': 'text', 'text': f'number {i}', 'predict': True}],
      'meta': {'i': i, 'tags': ['a', 'b']}}


def test_record_roundtrip_keeps_every_field():
  rec = _record(7)
  out = records.decode_record(records.encode_record(rec), 'test:0')
  assert out == rec


def test_unknown_record_version_is_rejected_naming_version_and_source():
  data = msgpack.packb({'format': records.FORMAT_NAME, 'version': 99, 'id': 'x',
                        'task': 't', 'segments': []}, use_bin_type=True)
  with pytest.raises(BadInputError, match=r'version 99 is not supported') as e:
    records.decode_record(data, 'shard.array_record:5')
  assert e.value.source == 'shard.array_record:5'
  with pytest.raises(BadInputError, match='not a gemjax record'):
    records.decode_record(b'\x00garbage', 'shard.array_record:6')


def test_invalid_record_names_the_bad_field():
  rec = _record(1)
  rec['segments'][0] = {'kind': 'image', 'data': b'', 'format': 'png'}
  with pytest.raises(BadInputError, match=r'segments\[0\]\.data'):
    records.encode_record(rec)
  with pytest.raises(BadInputError, match=r'segments\[1\]\.kind'):
    records.validate_record({'id': 'a', 'task': 't', 'segments': [
        {'kind': 'text', 'text': 'x'}, {'kind': 'smell'}]})


def test_shards_are_written_round_robin_and_read_back_in_global_order(tmp_path):
  recs = [_record(i) for i in range(10)]
  paths, counts = records.write_shards(recs, str(tmp_path / 'd' / 'train'), 3)
  assert counts == [4, 3, 3]
  assert [os.path.basename(p) for p in paths] == [
      f'train-0000{i}-of-00003.array_record' for i in range(3)]
  src = sources.ArrayRecordSource(str(tmp_path / 'd' / 'train'))
  assert len(src) == 10
  # Shard 0 holds records 0, 3, 6, 9; the global index runs shard by shard.
  item = src[5]
  assert item['where'] == f'{paths[1]}:1'
  assert records.decode_record(item['record'], item['where'])['id'] == 'r4'
  ids = sorted(records.decode_record(src[i]['record'], '')['meta']['i'] for i in range(10))
  assert ids == list(range(10))
  # Globs, directories and file lists resolve to the same shards.
  assert len(sources.ArrayRecordSource(str(tmp_path / 'd' / '*.array_record'))) == 10
  assert len(sources.ArrayRecordSource(str(tmp_path / 'd'))) == 10
  assert len(sources.ArrayRecordSource(paths[:1])) == 4


def test_corrupt_or_missing_shard_fails_at_startup_naming_the_file(tmp_path):
  paths, _ = records.write_shards([_record(i) for i in range(4)], str(tmp_path / 'ok'), 1)
  garbage = tmp_path / 'garbage-00000-of-00001.array_record'
  garbage.write_bytes(b'not an array record' * 100)
  truncated = tmp_path / 'trunc.array_record'
  data = open(paths[0], 'rb').read()
  truncated.write_bytes(data[:len(data) // 2])
  for bad in (garbage, truncated):
    with pytest.raises(sources.ShardError, match='corrupt or truncated') as e:
      sources.ArrayRecordSource([paths[0], str(bad)])
    assert e.value.source == str(bad)
  with pytest.raises(sources.ShardError, match='does not exist'):
    sources.ArrayRecordSource([str(tmp_path / 'nope.array_record')])
  with pytest.raises(sources.ShardError, match='no ArrayRecord shard matches'):
    sources.ArrayRecordSource(str(tmp_path / 'nothing-here'))


def test_shard_written_by_a_newer_format_fails_at_startup(tmp_path):
  path = str(tmp_path / 'new.array_record')
  w = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  w.write(msgpack.packb({'format': records.FORMAT_NAME, 'version': 2, 'id': 'x',
                         'task': 't', 'segments': []}))
  w.close()
  with pytest.raises(sources.ShardError, match=r'version 2 is not supported') as e:
    sources.ArrayRecordSource(path)
  assert e.value.source == path


def test_folder_source_reads_text_media_with_caption_and_json(tmp_path):
  (tmp_path / 'a_story.txt').write_text('Once upon a time.')
  (tmp_path / 'b_cat.png').write_bytes(_png(10))
  (tmp_path / 'b_cat.txt').write_text('a grey square\n')
  (tmp_path / 'c_pair.json').write_text(json.dumps({'task': 'pair', 'segments': [
      {'kind': 'image', 'path': 'b_cat.png'},
      {'kind': 'image', 'data_b64': base64.b64encode(_png(20)).decode(), 'format': 'png'},
      {'kind': 'text', 'text': 'same?'}, {'kind': 'text', 'text': 'no', 'predict': True}]}))
  (tmp_path / 'd_broken.json').write_text('{not json')
  src = sources.FolderSource(str(tmp_path))
  assert len(src) == 4
  story, cat, pair, broken = (src[i] for i in range(4))
  assert story['record']['task'] == 'text'
  assert story['record']['segments'] == [{'kind': 'text', 'text': 'Once upon a time.',
                                          'predict': True}]
  assert cat['record']['task'] == 'caption'
  assert [s['kind'] for s in cat['record']['segments']] == ['image', 'text']
  assert cat['record']['segments'][1]['text'] == 'a grey square'
  assert pair['record']['segments'][0]['data'] == _png(10)
  assert pair['record']['segments'][1]['data'] == _png(20)
  # A broken file is handed on as an error (the pipeline policy decides).
  assert broken['where'].endswith('d_broken.json')
  assert broken['error'][0] == 'record' and 'invalid JSON' in broken['error'][1]


def test_write_cli_from_jsonl_and_folder_then_inspect(tmp_path, capsys):
  media = tmp_path / 'img.png'
  media.write_bytes(_png(3))
  manifest = tmp_path / 'm.jsonl'
  lines = [{'id': f'j{i}', 'task': 'caption', 'segments': [
      {'kind': 'image', 'path': 'img.png'}, {'kind': 'text', 'text': str(i), 'predict': True}]}
           for i in range(5)]
  manifest.write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
  out = str(tmp_path / 'shards' / 'train')
  assert data_cli.main(['write', '--from-jsonl', str(manifest), '--out', out,
                        '--shards', '2']) == 0
  src = sources.ArrayRecordSource(out)
  assert len(src) == 5
  rec = records.decode_record(src[0]['record'], '')
  assert rec['segments'][0] == {'kind': 'image', 'data': _png(3), 'format': 'png',
                                'predict': False}
  folder = tmp_path / 'folder'
  folder.mkdir()
  (folder / 'x.txt').write_text('hello')
  assert data_cli.main(['write', '--from-folder', str(folder), '--out',
                        str(tmp_path / 'f' / 'all')]) == 0
  assert data_cli.main(['inspect', str(tmp_path / 'shards')]) == 0
  assert '5 records in 2 shards; bad: 0' in capsys.readouterr().out
  # A bad manifest line stops the writer with the file and line number.
  manifest.write_text(json.dumps(lines[0]) + '\n{"id": 1, "task": "t"\n')
  assert data_cli.main(['write', '--from-jsonl', str(manifest), '--out', out]) == 2
  assert f'{manifest}:2' in capsys.readouterr().err


# ---------------------------------------------------------------- TFDS


_TFDS_CLASSES = []  # TFDS registers builder classes by name: define them once


def _tfds_builders(data_dir):
  if not _TFDS_CLASSES:
    _TFDS_CLASSES.extend(_define_tfds_builders())
  for cls in _TFDS_CLASSES:
    cls(data_dir=str(data_dir), file_format='array_record').download_and_prepare()


def _define_tfds_builders():
  import tensorflow_datasets as tfds

  class GemjaxTinyRecords(tfds.core.GeneratorBasedBuilder):
    """Encoded gemjax records in a `record` feature."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'record': tfds.features.Tensor(shape=(), dtype=np.object_)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(6)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'record': records.encode_record(_record(i))}

  class GemjaxTinyDigits(tfds.core.GeneratorBasedBuilder):
    """(image, label) like MNIST."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          # A Tensor, not tfds.features.Image: Image encoding needs TensorFlow.
          {'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
           'label': tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'image': np.full((8, 8, 1), 20 * i, np.uint8), 'label': i}

  return GemjaxTinyRecords, GemjaxTinyDigits


def test_tfds_source_reads_a_dataset_built_locally(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  _tfds_builders(tmp_path)
  src = sources.TfdsSource('gemjax_tiny_records', 'train', data_dir=str(tmp_path))
  assert len(src) == 6
  got = sorted(records.decode_record(src[i]['record'], src[i]['where'])['id']
               for i in range(6))
  assert got == [f'r{i}' for i in range(6)]
  assert src[2]['where'] == 'tfds:gemjax_tiny_records/train:2'
  digits = sources.TfdsSource('gemjax_tiny_digits', 'train', data_dir=str(tmp_path),
                              convert=sources.ImageLabelToRecord(prompt='Which digit?'))
  rec = digits[0]['record']
  label = rec['meta']['label']
  assert rec['segments'][2] == {'kind': 'text', 'text': str(label), 'predict': True}
  from PIL import Image
  pixels = np.asarray(Image.open(io.BytesIO(rec['segments'][0]['data'])))
  assert pixels.shape == (8, 8) and np.all(pixels == 20 * label)
  with pytest.raises(sources.ShardError, match='tfds:no_such_dataset'):
    sources.TfdsSource('no_such_dataset', data_dir=str(tmp_path))


# ---------------------------------------------------------------- sample corpus


def _sample_records(split: str, task: str) -> list[dict]:
  src = sources.ArrayRecordSource(os.path.join(SAMPLE, split, f'{task}-*'))
  return [records.decode_record(src[i]['record'], src[i]['where']) for i in range(len(src))]


def test_sample_corpus_splits_share_no_source_item_and_are_balanced():
  manifest = json.load(open(os.path.join(SAMPLE, 'manifest.json')))
  image_ids, voices, photos, topics = {}, {}, {}, {}
  for split in ('train', 'validation', 'test'):
    tasks = manifest['splits'][split]
    assert set(tasks) == {'image_digit', 'speech_digit', 'same_digit', 'video_digits',
                          'photo_caption', 'text_lm', 'draw_digit', 'draw_name'}
    img = _sample_records(split, 'image_digit')
    image_ids[split] = {int(r['meta']['source'].split('[')[1][:-1]) for r in img}
    same = _sample_records(split, 'same_digit')
    video = _sample_records(split, 'video_digits')
    image_ids[split] |= {r['meta']['image_index'] for r in same}
    image_ids[split] |= {i for r in video for i in r['meta']['image_indices']}
    # The drawing tasks show the split's own images as targets, never another split's.
    for task in ('draw_digit', 'draw_name'):
      draw = _sample_records(split, task)
      assert draw and all(r['segments'][1]['predict'] for r in draw)
      drawn = {int(r['meta']['source'].split('[')[1][:-1]) for r in draw}
      assert drawn <= image_ids[split], (split, task)
    speech = _sample_records(split, 'speech_digit')
    voices[split] = {r['meta']['voice'] for r in speech + same}
    photos[split] = {r['meta']['photo'] for r in _sample_records(split, 'photo_caption')}
    topics[split] = {r['meta']['topic'] for r in _sample_records(split, 'text_lm')}
    # same_digit is exactly balanced, and its answer matches its labels.
    answers = collections.Counter(r['segments'][-1]['text'] for r in same)
    assert answers['yes'] == answers['no'] == len(same) // 2
    for r in same:
      assert (r['segments'][-1]['text'] == 'yes') == (
          r['meta']['image_digit'] == r['meta']['spoken_digit'])
    # Every digit is spoken equally often in each split.
    assert set(collections.Counter(r['meta']['digit'] for r in speech).values()) == {
        len(speech) // 10}
    assert all(r['segments'][-1]['predict'] for r in img + speech + same + video)
  for a, b in (('train', 'validation'), ('train', 'test'), ('validation', 'test')):
    for kind in (image_ids, voices, photos, topics):
      assert not kind[a] & kind[b], (a, b)
  assert len(image_ids['train']) >= 1400 and len(voices['train']) >= 30


def test_tfds_and_folder_datasets_feed_the_pipeline(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  from gemjax.config import DatasetConfig
  from gemjax.data import pipeline
  from gemjax.data.sequence import SequenceBuilder
  from gemjax.tokenizers.text import ByteTokenizer

  _tfds_builders(tmp_path / 'tfds')
  folder = tmp_path / 'folder'
  folder.mkdir()
  (folder / 'a.txt').write_text('a short story')
  (folder / 'b.png').write_bytes(_png(50))
  (folder / 'b.txt').write_text('grey')
  settings = pipeline.DataSettings(datasets=(
      DatasetConfig('tfds:gemjax_tiny_records', data_dir=str(tmp_path / 'tfds')),
      DatasetConfig('gemjax_tiny_digits', kind='tfds', data_dir=str(tmp_path / 'tfds')),
      DatasetConfig(str(folder))), converts={1: sources.ImageLabelToRecord()},
      patch_budgets={'image': 8}, read_threads=0)
  it = pipeline.make_eval_iterator(settings, SequenceBuilder(ByteTokenizer()),
                                   seq_len=64, batch_size=4)
  batches = list(it)
  assert it.stats['examples'] == 6 + 5 + 2 and it.stats['bad'] == 0
  assert sum(int((b['image_slots'] >= 0).sum()) for b in batches) == 6 + 5 + 1
