"""Images as outputs: a predicted image becomes its discrete codes, condition
dropout for classifier-free guidance, the config wiring, and the draw tasks of
the sample corpus."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from gemjax.batch import IMAGE_CODE, TEXT
from gemjax.config import DatasetConfig, load_config
from gemjax.data import condition, pipeline, records, sources
from gemjax.data.sequence import SequenceBuilder
from gemjax.errors import BadInputError, ConfigError
from gemjax.tokenizers.image import ImageTokenizer
from gemjax.tokenizers.text import ByteTokenizer

SAMPLE = os.path.join(os.path.dirname(__file__), '..', '..', 'data', 'sample')


class FakeCodes:
  """The ImageCodeTokenizer interface: code (r, c) = the red value of pixel
  (r, c) of the image as given, mod num_codes; counts its calls."""

  def __init__(self, num_codes=8):
    self.num_codes = num_codes
    self.calls = 0

  def encode(self, image):
    self.calls += 1
    a = np.asarray(image)
    a = a[..., 0] if a.ndim == 3 else a
    return (a.astype(np.int32) % self.num_codes)


def png(pixels_HxW) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(pixels_HxW, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


def draw_record(i, prompt=None):
  return {'id': f'd/{i}', 'task': 'draw', 'meta': {},
          'segments': [{'kind': 'text', 'text': prompt or f'Draw {i:04d}.', 'predict': False},
                       {'kind': 'image', 'data': png([[i // 8, i % 8]]), 'format': 'png',
                        'predict': True}]}


def builder(codes=None, **kw):
  codes = FakeCodes() if codes is None else codes
  return SequenceBuilder(ByteTokenizer(num_image_codes=8), image_codes=codes, **kw)


# ------------------------------------------------------ predicted image -> codes


def test_predicted_image_becomes_begin_codes_end_with_grid_positions_and_code_weights():
  pixels = np.arange(12).reshape(3, 4) * 3 % 256
  b = builder(loss_weights={'image_code': 2.0, 'image': 0.5, 'text': 1.0})
  rec = {'segments': [{'kind': 'text', 'text': 'Draw.', 'predict': False},
                      {'kind': 'image', 'data': png(pixels), 'predict': True},
                      {'kind': 'text', 'text': 'ok', 'predict': True}]}
  ex = b.build(rec)
  L = b.layout
  want_codes = pixels % 8                      # the fake tokenizer, by hand
  h, w = want_codes.shape
  s = 1 + len('Draw.')                         # index of begin_image
  tokens = ex['tokens']
  assert tokens[s] == L.begin_image and tokens[s + 1 + h * w] == L.end_image
  np.testing.assert_array_equal(tokens[s + 1:s + 1 + h * w],
                                L.image_code_start + want_codes.ravel())
  assert np.all(ex['modality'][s + 1:s + 1 + h * w] == IMAGE_CODE)
  assert ex['modality'][s] == TEXT and ex['modality'][s + 1 + h * w] == TEXT
  st = s + 1                                   # text positions run 0..s, so next = s + 1
  rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  np.testing.assert_array_equal(
      ex['positions'][s + 1:s + 1 + h * w],
      np.stack([np.full(h * w, st), st + rr.ravel(), st + cc.ravel()], -1))
  assert np.all(ex['block_ids'] == 0)          # discrete codes: causal, no block
  assert not ex['image_slots'].size            # no patches
  # Weight at i = weight of predicting token i + 1: the prompt (and bos) 0,
  # begin_image .. end_image 2.0 (image_code), the text answer 1.0, eos 1.0.
  lw = ex['loss_weights']
  np.testing.assert_array_equal(lw[:s - 1], 0.0)
  np.testing.assert_array_equal(lw[s - 1:s + 1 + h * w], 2.0)
  np.testing.assert_array_equal(lw[s + 1 + h * w:-1], 1.0)
  assert lw[-1] == 0.0
  # Same example as giving the codes directly (the image_code path).
  direct = b.build({'segments': [rec['segments'][0],
                                 {'kind': 'image_code', 'codes': want_codes, 'predict': True},
                                 rec['segments'][2]]})
  for k in ex:
    np.testing.assert_array_equal(ex[k], direct[k], err_msg=k)


def test_unpredicted_image_stays_patches_and_never_calls_the_code_tokenizer():
  codes = FakeCodes()
  b = SequenceBuilder(ByteTokenizer(num_image_codes=8), image=ImageTokenizer(max_tokens=4),
                      image_codes=codes)
  ex = b.build({'segments': [{'kind': 'image', 'data': png(np.zeros((28, 28)))},
                             {'kind': 'text', 'text': '7'}]})
  assert codes.calls == 0 and ex['image_slots'].size == 4
  assert not np.any(ex['modality'] == IMAGE_CODE)


def test_codes_are_cached_by_content_like_media():
  codes = FakeCodes()
  b = builder(codes, media_cache_mb=16)
  first = b.build(draw_record(5))
  again = b.build(draw_record(5))      # seen twice: now cached
  assert codes.calls == 2
  for k in first:
    np.testing.assert_array_equal(first[k], again[k], err_msg=k)
  b.build(draw_record(5))
  assert codes.calls == 2
  b.build(draw_record(6))
  assert codes.calls == 3
  uncached = builder(FakeCodes()).build(draw_record(5))
  for k in first:
    np.testing.assert_array_equal(first[k], uncached[k], err_msg=k)


def test_predicted_image_without_a_code_tokenizer_names_source_and_setting():
  b = SequenceBuilder(ByteTokenizer(num_image_codes=8))
  with pytest.raises(BadInputError, match=r'shard-3:segments\[1\].*data\.image_codes'):
    b.build(draw_record(1), source='shard-3')


def test_builder_rejects_a_code_tokenizer_larger_than_the_layout():
  with pytest.raises(ValueError, match='num_image_codes=1000'):
    SequenceBuilder(ByteTokenizer(num_image_codes=8), image_codes=FakeCodes(1000))


# ------------------------------------------------------ condition dropout


def test_drop_condition_removes_the_prompt_before_the_first_predicted_image_only():
  rec = {'id': 'x', 'segments': [
      {'kind': 'text', 'text': 'Draw a digit, then name it.', 'predict': False},
      {'kind': 'image', 'data': b'in', 'predict': False},       # an input image stays
      {'kind': 'text', 'text': 'and', 'predict': False},
      {'kind': 'image', 'data': b'out', 'predict': True},
      {'kind': 'text', 'text': 'after', 'predict': False},      # after the image: kept
      {'kind': 'text', 'text': '7', 'predict': True}]}
  before = [dict(s) for s in rec['segments']]
  out = condition.drop_condition(rec)
  assert [s.get('data', s.get('text')) for s in out['segments']] == [b'in', b'out', 'after', '7']
  assert rec['segments'] == before and out['id'] == 'x'    # input untouched
  text_only = {'segments': [{'kind': 'text', 'text': 'q', 'predict': False},
                            {'kind': 'text', 'text': 'a'}]}
  assert condition.drop_condition(text_only) == text_only   # nothing to drop
  # The unconditional example: bos, begin_image, codes, end_image, eos.
  b = builder()
  ex = b.build(condition.drop_condition(draw_record(9)))
  L = b.layout
  np.testing.assert_array_equal(ex['tokens'], [L.bos, L.begin_image, L.image_code_start + 1,
                                               L.image_code_start + 1, L.end_image, L.eos])


def test_condition_coin_is_deterministic_with_the_binomial_rate():
  n, p = 20000, 0.1
  draws = np.array([condition.drops_condition(p, 7, (2, 0), i) for i in range(n)])
  again = np.array([condition.drops_condition(p, 7, (2, 0), i) for i in range(n)])
  other = np.array([condition.drops_condition(p, 8, (2, 0), i) for i in range(n)])
  np.testing.assert_array_equal(draws, again)
  assert (draws != other).any()
  # 5 standard deviations of Binomial(n, p): a fixed seed, so never flaky,
  # but a biased coin (or p applied twice) fails.
  assert abs(draws.sum() - n * p) < 5 * np.sqrt(n * p * (1 - p))
  assert not any(condition.drops_condition(0.0, 7, (0,), i) for i in range(100))


@pytest.fixture(scope='module')
def draw_shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('draw')
  records.write_shards([draw_record(i) for i in range(64)], str(root / 'draw'), 2)
  return root


def _examples(batches, layout):
  """(record index, dropped) of each packed example, in order."""
  out = []
  for batch in batches:
    for row in batch['tokens']:
      for c in np.nonzero(row == layout.bos)[0]:
        dropped = row[c + 1] == layout.begin_image
        k = np.nonzero(row[c:] == layout.begin_image)[0][0] + c
        hi, lo = row[k + 1:k + 3] - layout.image_code_start
        out.append((int(hi * 8 + lo), bool(dropped)))
  return out


def _draw_settings(root, p):
  return pipeline.DataSettings(datasets=(DatasetConfig(str(root / 'draw'), cond_dropout=p),),
                               read_threads=1, split_text=False)


def test_cond_dropout_in_the_pipeline_is_reproducible_resumable_and_train_only(draw_shards):
  b = builder()
  settings = _draw_settings(draw_shards, 0.25)
  it = pipeline.make_train_iterator(settings, b, seq_len=64, batch_size=4, seed=1)
  batches = [next(it) for _ in range(5)]
  state = it.get_state()
  batches += [next(it) for _ in range(15)]
  ex = _examples(batches, b.layout)
  assert len(ex) > 250                               # ~5 epochs of 64 records
  rate = np.mean([d for _, d in ex])
  assert abs(rate - 0.25) < 0.1, rate
  # Each epoch draws afresh: some record is dropped in one epoch, kept in another.
  by_record = {}
  for i, d in ex:
    by_record.setdefault(i, set()).add(d)
  assert any(v == {True, False} for v in by_record.values())
  # Same seed: same batches; resumed from the saved state: the same rest.
  same = pipeline.make_train_iterator(settings, b, seq_len=64, batch_size=4, seed=1)
  assert _examples([next(same) for _ in range(20)], b.layout) == ex
  resumed = pipeline.make_train_iterator(settings, b, seq_len=64, batch_size=4, seed=1)
  resumed.set_state(state)
  assert _examples([next(resumed) for _ in range(15)], b.layout) == \
      _examples(batches[5:], b.layout)
  # Another seed drops other records.
  other = pipeline.make_train_iterator(settings, b, seq_len=64, batch_size=4, seed=2)
  assert _examples([next(other) for _ in range(20)], b.layout) != ex
  # Evaluation never drops the condition.
  ev = list(pipeline.make_eval_iterator(settings, b, seq_len=64, batch_size=4))
  ev_ex = _examples(ev, b.layout)
  assert sorted(i for i, _ in ev_ex) == list(range(64))
  assert not any(d for _, d in ev_ex)


# ------------------------------------------------------ config


def test_config_validates_cond_dropout_and_image_codes_type():
  cfg = load_config('configs/nano.yaml')
  assert cfg.data.image_codes == 'data/sample/image_codes'
  assert {d.path.split('/')[-1]: d.cond_dropout for d in cfg.data.datasets
          }['draw_digit-*'] == 0.1
  for bad in ('1.0', '-0.1', 'nan'):
    with pytest.raises(ConfigError, match=r'data.datasets\[0\].cond_dropout=.* in \[0, 1\)'):
      load_config('configs/nano.yaml', [f'data.datasets.0.cond_dropout={bad}'])


def test_registry_reserves_the_codes_in_the_one_layout(monkeypatch):
  from gemjax.data import registry
  monkeypatch.setattr(registry, 'image_code_tokenizer', lambda cfg: FakeCodes(1000))
  cfg = load_config('configs/nano.yaml')
  b = registry.sequence_builder(cfg)
  assert b.layout.num_image_codes == 1000 and b.layout.size == 1272
  assert b.image_codes.num_codes == 1000
  assert registry.text_tokenizer(cfg).layout == b.layout
  with pytest.raises(ConfigError, match=r'model.vocab_size=1271 .* 1000 image codes'):
    registry.sequence_builder(load_config('configs/nano.yaml', ['model.vocab_size=1271']))
  # No codes configured: the layout has none and the check is the old one.
  monkeypatch.undo()
  plain = registry.sequence_builder(load_config('configs/nano.yaml', [
      "data.image_codes=''", 'model.vocab_size=272']))
  assert plain.layout.num_image_codes == 0 and plain.image_codes is None


def test_a_missing_code_tokenizer_directory_is_a_config_error(tmp_path):
  pytest.importorskip('gemjax.tokenizers.image_codes')
  from gemjax.data import registry
  cfg = load_config('configs/nano.yaml', [f'data.image_codes={tmp_path / "nothing"}'])
  with pytest.raises(ConfigError, match='data.image_codes='):
    registry.sequence_builder(cfg)


# ------------------------------------------------------ sample corpus


@pytest.mark.parametrize('split', ['train', 'validation', 'test'])
def test_sample_draw_tasks_read_back_with_their_segments(split):
  def read(task):
    src = sources.open_source('auto', os.path.join(SAMPLE, split, f'{task}-*'))
    return [records.decode_record(src[i]['record'], src[i]['where']) for i in range(len(src))]
  digits = {r['id']: r for r in read('image_digit')}
  b = builder()
  for task in ('draw_digit', 'draw_name'):
    recs = read(task)
    assert len(recs) == len(digits)
    for r in recs[:50] if split == 'train' else recs:
      d = r['meta']['digit']
      src = digits[r['meta']['image_digit_id']]
      assert src['meta']['digit'] == d
      image = next(s for s in src['segments'] if s['kind'] == 'image')['data']
      segs = r['segments']
      if task == 'draw_digit':
        assert [(s['kind'], s['predict']) for s in segs] == [('text', False), ('image', True)]
        assert segs[0]['text'] == f'Draw the digit {d}.'
      else:
        assert [(s['kind'], s['predict']) for s in segs] == [
            ('text', False), ('image', True), ('text', True)]
        assert segs[0]['text'] == 'Draw a digit, then name it.' and segs[2]['text'] == str(d)
      assert segs[1]['data'] == image and r['task'] == task
    ex = b.build(recs[0])
    # 28x28 digit through the fake tokenizer: 784 codes + markers + eos weighted.
    n_text = 1 if task == 'draw_name' else 0
    assert (ex['loss_weights'] > 0).sum() == 784 + 3 + n_text


def test_unconditional_prompt_is_the_prompt_of_the_dropped_record():
  def prompt_of(rec):   # the segments before the trailing predicted run
    segs = rec['segments']
    cut = len(segs)
    while cut and segs[cut - 1].get('predict', segs[cut - 1]['kind'] == 'text'):
      cut -= 1
    return dict(rec, segments=segs[:cut])
  for rec in (draw_record(3),
              {'segments': [{'kind': 'image', 'data': b'in'},
                            {'kind': 'text', 'text': 'Draw a digit, then name it.',
                             'predict': False},
                            {'kind': 'image', 'data': b'out', 'predict': True},
                            {'kind': 'text', 'text': '7', 'predict': True}]}):
    assert prompt_of(condition.drop_condition(rec)) == \
        condition.unconditional_prompt(prompt_of(rec))
