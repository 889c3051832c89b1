"""Sequence builder: markers, placeholders, slots, block ids, M-RoPE positions,
targets and loss weights of one example, and the padding collate."""

import io
import pickle

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from gemjax.batch import AUDIO, IMAGE, IMAGE_CODE, TEXT, VIDEO, validate_batch
from gemjax.data.sequence import SequenceBuilder, collate
from gemjax.errors import BadInputError
from gemjax.tokenizers.audio import AudioTokenizer
from gemjax.tokenizers.image import ImageTokenizer
from gemjax.tokenizers.text import ByteTokenizer
from gemjax.tokenizers.video import VideoTokenizer


def png(h, w, seed=0) -> bytes:
  buf = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(buf, 'PNG')
  return buf.getvalue()


def wav(seconds, sr=16000) -> bytes:
  t = np.arange(int(seconds * sr)) / sr
  buf = io.BytesIO()
  sf.write(buf, 0.3 * np.sin(2 * np.pi * 300 * t), sr, format='WAV')
  return buf.getvalue()


def mp4_with_audio(seconds=3, rate=10, size=(28, 28)) -> bytes:
  buf = io.BytesIO()
  with av.open(buf, 'w', format='mp4') as out:
    vs = out.add_stream('mpeg4', rate=rate)
    vs.width, vs.height = size
    vs.pix_fmt = 'yuv420p'
    aus = out.add_stream('aac', rate=16000)
    aus.layout = 'mono'
    for k in range(seconds * rate):
      img = np.full((size[1], size[0], 3), 8 * k, np.uint8)
      for p in vs.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
        out.mux(p)
    for p in vs.encode():
      out.mux(p)
    y = (0.3 * np.sin(np.arange(seconds * 16000) / 7)).astype(np.float32)
    for s in range(0, len(y), 1024):
      fr = av.AudioFrame.from_ndarray(y[None, s:s + 1024], format='flt', layout='mono')
      fr.sample_rate, fr.pts = 16000, s
      for p in aus.encode(fr):
        out.mux(p)
    for p in aus.encode():
      out.mux(p)
  return buf.getvalue()


@pytest.fixture(scope='module')
def builder():
  audio = AudioTokenizer()
  video = VideoTokenizer(fps=1.0, max_frames=3, image=ImageTokenizer(max_tokens=4),
                         include_audio=True, audio=audio)
  return SequenceBuilder(ByteTokenizer(num_image_codes=8),
                         image=ImageTokenizer(patch_size=14, max_tokens=16),
                         audio=audio, video=video)


@pytest.fixture(scope='module')
def video_bytes():
  return mp4_with_audio()


def ids(builder, text):
  return list(builder.text.encode(text))


def check_invariants(ex, layout):
  """What every example must satisfy, whatever the record."""
  T = len(ex['tokens'])
  np.testing.assert_array_equal(ex['targets'][:-1], ex['tokens'][1:])
  assert ex['targets'][-1] == layout.pad and ex['loss_weights'][-1] == 0
  assert np.all(ex['loss_weights'][ex['targets'] == layout.placeholder] == 0)
  slots = []
  for m, code in (('image', IMAGE), ('audio', AUDIO), ('video', VIDEO)):
    s = ex[f'{m}_slots']
    assert ex[f'{m}_patches'].shape[0] == len(s) and ex[f'{m}_patches'].dtype == np.float32
    assert np.all(np.diff(s) > 0) and np.all((0 <= s) & (s < T))
    assert np.all(ex['tokens'][s] == layout.placeholder)
    assert np.all(ex['modality'][s] == code)
    assert np.all(ex['block_ids'][s] > 0)
    slots += list(s)
  # Every placeholder has exactly one patch, and nothing else has one.
  assert sorted(slots) == list(np.flatnonzero(ex['tokens'] == layout.placeholder))
  assert np.all(ex['block_ids'][ex['tokens'] != layout.placeholder] == 0)
  text_like = np.isin(ex['modality'], [TEXT])
  p = ex['positions'][text_like]
  assert np.all(p[:, 0] == p[:, 1]) and np.all(p[:, 1] == p[:, 2])
  for key, dtype in (('tokens', np.int32), ('modality', np.int8), ('positions', np.int32),
                     ('block_ids', np.int32), ('targets', np.int32),
                     ('loss_weights', np.float32)):
    assert ex[key].dtype == dtype and ex[key].shape[0] == T


def test_text_only_targets_and_weights(builder):
  L = builder.layout
  ex = builder.build({'segments': [{'kind': 'text', 'text': 'ab', 'predict': False},
                                   {'kind': 'text', 'text': 'cd', 'predict': True}]})
  assert list(ex['tokens']) == [L.bos] + ids(builder, 'abcd') + [L.eos]
  np.testing.assert_array_equal(ex['positions'], np.repeat(np.arange(6)[:, None], 3, 1))
  assert list(ex['targets']) == ids(builder, 'abcd') + [L.eos, L.pad]
  # weight[i] is for predicting token i+1: c, d and eos (last segment predicted).
  assert list(ex['loss_weights']) == [0, 0, 1, 1, 1, 0]
  assert not ex['modality'].any() and not ex['block_ids'].any()
  check_invariants(ex, L)


def test_image_block_markers_placeholders_slots_and_positions(builder):
  L = builder.layout
  image = png(28, 56)  # 2 x 4 patches of 14
  ex = builder.build({'segments': [{'kind': 'text', 'text': 'x'},
                                   {'kind': 'image', 'data': image},
                                   {'kind': 'text', 'text': 'y'}]}, source='r1')
  P = L.placeholder
  assert list(ex['tokens']) == ([L.bos] + ids(builder, 'x') + [L.begin_image] + [P] * 8 +
                                [L.end_image] + ids(builder, 'y') + [L.eos])
  np.testing.assert_array_equal(ex['image_slots'], np.arange(3, 11))
  np.testing.assert_array_equal(ex['image_patches'],
                                builder.image.tokenize(image).patches)
  assert list(ex['modality']) == [0, 0, 0] + [IMAGE] * 8 + [0, 0, 0]
  assert list(ex['block_ids']) == [0, 0, 0] + [1] * 8 + [0, 0, 0]
  # bos 0, x 1, begin_image 2; image st = 3: (3, 3 + row, 3 + col); its max is
  # 3 + 3 = 6, so end_image resumes at 7.
  rows, cols = np.divmod(np.arange(8), 4)
  np.testing.assert_array_equal(ex['positions'][3:11],
                                np.stack([np.full(8, 3), 3 + rows, 3 + cols], -1))
  np.testing.assert_array_equal(ex['positions'][[0, 1, 2, 11, 12, 13], 0], [0, 1, 2, 7, 8, 9])
  # Text defaults to predict=True, media to False: x, y and eos are targets,
  # nothing of the image (markers included) is.
  assert list(np.flatnonzero(ex['loss_weights'])) == [0, 11, 12]
  check_invariants(ex, L)


def test_audio_block_positions_follow_time_and_band(builder):
  L = builder.layout
  ex = builder.build({'segments': [{'kind': 'audio', 'data': wav(0.5)},
                                   {'kind': 'text', 'text': 'z'}]})
  audio = builder.audio.tokenize(wav(0.5))
  n = audio.num_tokens
  assert list(ex['tokens'][:2]) == [L.bos, L.begin_audio]
  assert ex['tokens'][2 + n] == L.end_audio
  st = 2
  np.testing.assert_array_equal(
      ex['positions'][2:2 + n],
      np.stack([st + audio.time_positions, st + audio.bands, st + audio.bands], -1))
  np.testing.assert_allclose(ex['audio_patches'], audio.patches)
  last = st + max(audio.time_positions.max(), audio.bands.max())
  assert ex['positions'][2 + n, 0] == last + 1  # end_audio resumes at max + 1
  check_invariants(ex, L)


def test_block_ids_count_blocks_in_order(builder):
  ex = builder.build({'segments': [{'kind': 'image', 'data': png(14, 14)},
                                   {'kind': 'audio', 'data': wav(0.1)},
                                   {'kind': 'image', 'data': png(28, 14, seed=1)}]})
  blocks = ex['block_ids'][ex['block_ids'] > 0]
  assert list(np.unique(blocks)) == [1, 2, 3]
  assert np.all(np.diff(blocks) >= 0)
  assert set(ex['block_ids'][ex['modality'] == AUDIO]) == {2}
  check_invariants(ex, builder.layout)


def test_video_frames_audio_chunks_and_separators(builder, video_bytes):
  L = builder.layout
  ex = builder.build({'segments': [{'kind': 'video', 'data': video_bytes}]}, source='v')
  video = builder.video.tokenize(video_bytes)
  assert video.num_frames == 3 and video.audio is not None
  toks = ex['tokens']
  assert toks[1] == L.begin_video and toks[-2] == L.end_video
  st = 2  # bos 0, begin_video 1
  seps = np.flatnonzero(toks == L.frame_sep)
  assert len(seps) == 2
  # frame_sep before frame k sits at st + tau_k on all three axes.
  np.testing.assert_array_equal(ex['positions'][seps],
                                np.repeat(st + video.time_positions[1:, None], 3, 1))
  # Between separators: one frame block (video) then one audio chunk block.
  bounds = [2] + list(seps + 1)
  ends = list(seps) + [len(toks) - 2]
  for k, (a, b) in enumerate(zip(bounds, ends)):
    mod = ex['modality'][a:b]
    n_frame = video.frames[k].num_tokens
    assert np.all(mod[:n_frame] == VIDEO) and np.all(mod[n_frame:] == AUDIO)
    blocks = ex['block_ids'][a:b]
    assert len(set(blocks[:n_frame])) == 1 and len(set(blocks[n_frame:])) == 1
    assert blocks[0] != blocks[-1]
    frame_pos = ex['positions'][a:a + n_frame]
    assert np.all(frame_pos[:, 0] == st + video.time_positions[k])
    np.testing.assert_array_equal(frame_pos[:, 1:], st + video.frames[k].positions)
    audio_pos = ex['positions'][a + n_frame:b]
    t = (audio_pos[:, 0] - st) / builder.audio.positions_per_second
    assert np.all(t >= video.times[k] - 1e-6)
    if k + 1 < video.num_frames:
      assert np.all(t < video.times[k + 1])
  assert len(ex['audio_slots']) == video.audio.num_tokens
  assert len(ex['video_slots']) == sum(f.num_tokens for f in video.frames)
  # end_video resumes after the largest position of the whole video.
  assert ex['positions'][-2, 0] == ex['positions'][:-2].max() + 1
  check_invariants(ex, L)


def test_loss_weights_per_kind_and_image_codes(builder):
  L = builder.layout
  b = SequenceBuilder(builder.text, image=builder.image, audio=builder.audio,
                      video=builder.video,
                      loss_weights={'text': 0.5, 'image_code': 2.0, 'audio': 3.0})
  codes = np.array([[1, 2, 3], [4, 5, 6]])
  # (A predicted *image* is trained as its codes: tests/unit/test_image_output_data.py.)
  ex = b.build({'segments': [
      {'kind': 'text', 'text': 'q', 'predict': False},
      {'kind': 'audio', 'data': wav(0.2), 'predict': True},
      {'kind': 'image_code', 'codes': codes, 'predict': True},
      {'kind': 'text', 'text': 'ok', 'predict': True}]})
  tok, w = ex['tokens'], ex['loss_weights']
  weight_of_token = np.concatenate([[0.0], w[:-1]])  # weight given for predicting token j
  is_code = ex['modality'] == IMAGE_CODE
  assert list(tok[is_code]) == list(L.image_code_id(codes.ravel()))
  assert np.all(weight_of_token[is_code] == 2.0)
  assert np.all(weight_of_token[tok == L.placeholder] == 0)  # never predict a patch
  first_ba = np.flatnonzero(tok == L.begin_audio)[0]
  first_ea = np.flatnonzero(tok == L.end_audio)[0]
  assert weight_of_token[first_ba] == 3.0 and weight_of_token[first_ea] == 3.0  # audio markers
  assert weight_of_token[np.flatnonzero(tok == L.begin_image)[0]] == 2.0
  assert list(weight_of_token[-3:]) == [0.5, 0.5, 0.5]  # o, k, eos
  assert weight_of_token[1] == 0.0  # 'q' not predicted
  # 2-D codes get image-like positions (st, st + row, st + col); no block (causal).
  p = ex['positions'][is_code]
  st = p[0, 0]
  np.testing.assert_array_equal(p, np.stack([np.full(6, st), st + [0, 0, 0, 1, 1, 1],
                                             st + [0, 1, 2, 0, 1, 2]], -1))
  assert not ex['block_ids'][is_code].any()
  check_invariants(ex, L)


def test_no_bos_eos_option(builder):
  b = SequenceBuilder(builder.text, add_bos=False, add_eos=False)
  ex = b.build({'segments': [{'kind': 'text', 'text': 'hi'}]})
  assert list(ex['tokens']) == ids(builder, 'hi')
  assert list(ex['loss_weights']) == [1, 0]


def test_collate_pads_to_fixed_shapes(builder):
  L = builder.layout
  ex1 = builder.build({'segments': [{'kind': 'text', 'text': 'hello'}]})
  ex2 = builder.build({'segments': [{'kind': 'image', 'data': png(28, 28)},
                                    {'kind': 'text', 'text': 'a'}]})
  batch = builder.collate([ex1, ex2], seq_len=16, patch_budgets={'image': 6, 'audio': 3})
  validate_batch(batch)
  assert batch['tokens'].shape == (2, 16) and batch['image_patches'].shape == (2, 6, 588)
  assert batch['audio_patches'].shape == (2, 3, 256) and 'video_patches' not in batch
  n1, n2 = len(ex1['tokens']), len(ex2['tokens'])
  assert list(batch['segment_ids'][0]) == [1] * n1 + [0] * (16 - n1)
  assert np.all(batch['tokens'][0, n1:] == L.pad) and not batch['loss_weights'][0, n1:].any()
  assert list(batch['image_slots'][0]) == [-1] * 6
  assert list(batch['image_slots'][1]) == list(ex2['image_slots']) + [-1, -1]
  np.testing.assert_array_equal(batch['image_patches'][1, :4], ex2['image_patches'])
  assert not batch['image_patches'][1, 4:].any()
  np.testing.assert_array_equal(batch['positions'][1, :n2], ex2['positions'])


def test_collate_rejects_or_truncates_what_does_not_fit(builder):
  ex = builder.build({'segments': [{'kind': 'text', 'text': 'ab'},
                                   {'kind': 'image', 'data': png(28, 28)},
                                   {'kind': 'text', 'text': 'cd'}]})
  with pytest.raises(BadInputError, match='image patches 4 > budget 2'):
    collate([ex], 32, {'image': 2}, pad_id=builder.layout.pad)
  with pytest.raises(BadInputError, match='tokens > seq_len'):
    collate([ex], 5, {'image': 4}, pad_id=builder.layout.pad)
  batch = collate([ex], 32, {'image': 2}, pad_id=builder.layout.pad, truncate=True)
  cut = int(ex['image_slots'][2])  # tokens stop at the first patch that was dropped
  assert batch['segment_ids'][0].sum() == cut
  assert list(batch['image_slots'][0]) == list(ex['image_slots'][:2])
  assert batch['loss_weights'][0, cut - 1] == 0
  validate_batch(batch)


def test_builder_pickles_for_worker_processes(builder):
  clone = pickle.loads(pickle.dumps(builder))
  rec = {'segments': [{'kind': 'image', 'data': png(14, 28)}, {'kind': 'text', 'text': 'k'}]}
  a, b = builder.build(rec), clone.build(rec)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('record, modality, where, reason', [
    ('not a dict', 'record', 'r', 'segments'),
    ({'segments': []}, 'record', 'r', 'non-empty'),
    ({'segments': [{'kind': 'smell', 'data': b'x'}]}, 'record', 'r:segments[0]', 'kind'),
    ({'segments': [{'kind': 'image'}]}, 'image', 'r:segments[0]', "no 'data'"),
    ({'segments': [{'kind': 'text', 'text': 'a', 'predict': 'yes'}]}, 'record',
     'r:segments[0]', 'predict'),
    ({'segments': [{'kind': 'text', 'text': 'a'}, {'kind': 'image', 'data': b'\x89PNG broken'}]},
     'image', 'r:segments[1]', 'not a decodable image'),
    ({'segments': [{'kind': 'audio', 'data': wav(0.0)}]}, 'audio', 'r:segments[0]', 'zero-length'),
    ({'segments': [{'kind': 'video', 'data': b'junk' * 20}]}, 'video', 'r:segments[0]', 'decode'),
    ({'segments': [{'kind': 'image_code', 'codes': np.array([9])}]}, 'image_code',
     'r:segments[0]', 'outside'),
    ({'segments': [{'kind': 'text', 'text': 7}]}, 'text', 'r:segments[0]', 'str'),
])
def test_bad_records_raise_bad_input_error_naming_the_segment(builder, record, modality,
                                                              where, reason):
  with pytest.raises(BadInputError) as e:
    builder.build(record, source='r')
  assert e.value.modality == modality and e.value.source == where
  assert reason in e.value.reason


def test_max_length_is_enforced(builder):
  b = SequenceBuilder(builder.text, max_length=4)
  with pytest.raises(BadInputError, match='max_length'):
    b.build({'segments': [{'kind': 'text', 'text': 'hello'}]}, source='long')


def test_builder_rejects_mismatched_time_units():
  with pytest.raises(ValueError, match='positions_per_second'):
    SequenceBuilder(ByteTokenizer(), audio=AudioTokenizer(positions_per_second=10),
                    video=VideoTokenizer())
  with pytest.raises(ValueError, match='loss_weights'):
    SequenceBuilder(ByteTokenizer(), loss_weights={'smell': 1.0})


def test_media_cache_gives_identical_examples_and_evicts_to_its_budget():
  rec = {'segments': [{'kind': 'image', 'data': png(28, 42), 'predict': False},
                      {'kind': 'audio', 'data': wav(0.5), 'predict': False},
                      {'kind': 'video', 'data': mp4_with_audio(2), 'predict': False},
                      {'kind': 'text', 'text': 'same?', 'predict': True}]}
  plain = SequenceBuilder(ByteTokenizer())
  cached = SequenceBuilder(ByteTokenizer(), media_cache_mb=64)
  want = plain.build(rec)
  for n_cached in (0, 3, 3):               # seen once, admitted, hit
    got = cached.build(rec)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert len(cached._cache) == n_cached
  # A clone for a worker process starts empty; a tiny budget keeps one entry.
  assert len(pickle.loads(pickle.dumps(cached))._cache) == 0
  tiny = SequenceBuilder(ByteTokenizer(), media_cache_mb=1e-6)
  tiny.build(rec)
  tiny.build(rec)
  assert len(tiny._cache) == 1


def test_media_used_once_never_evicts_the_cached_corpus():
  # Budget for about one tokenized image: a stream of distinct videos (composed
  # ones are each used once) would evict it under plain LRU.
  image = {'segments': [{'kind': 'image', 'data': png(28, 28), 'predict': False}]}
  b = SequenceBuilder(ByteTokenizer(), media_cache_mb=0.01)
  b.build(image)
  b.build(image)
  assert [k[0] for k in b._cache] == ['image']
  for seed in range(4):
    frames = np.random.default_rng(seed).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    from gemjax.tokenizers.video import encode_mp4
    b.build({'segments': [{'kind': 'video', 'data': encode_mp4(frames), 'predict': False}]})
  assert [k[0] for k in b._cache] == ['image']
