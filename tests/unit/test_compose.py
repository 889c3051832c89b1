"""Videos composed on the fly from labelled images (gemjax/data/compose.py)
and the shared MP4 encoder (gemjax/tokenizers/video.py encode_mp4)."""

import io
import pickle

import av
import numpy as np
import pytest
from PIL import Image

from gemjax.config import DatasetConfig
from gemjax.data import pipeline, records, sources
from gemjax.data.compose import ImageVideoSource
from gemjax.errors import ConfigError
from gemjax.tokenizers.video import VideoTokenizer, encode_mp4

SAMPLE = 'data/sample/test'


@pytest.fixture(scope='module')
def images():
  return sources.open_source('auto', f'{SAMPLE}/image_digit-*')


def _decode(item):
  return records.decode_record(item['record'], item['where'])


def test_encoder_reproduces_the_corpus_videos_byte_for_byte(images):
  # The corpus script and training compose videos with one encoder: the
  # stored test videos come out identical from the PNGs of their frames.
  by_source = {}
  for i in range(len(images)):
    rec = _decode(images[i])
    by_source[rec['meta']['source']] = rec['segments'][0]['data']
  videos = sources.open_source('auto', f'{SAMPLE}/video_digits-*')
  for j in range(len(videos)):
    rec = _decode(videos[j])
    frames = [np.asarray(Image.open(io.BytesIO(by_source[f'sklearn.load_digits[{k}]'])).convert('L'))
              for k in rec['meta']['image_indices']]
    assert encode_mp4(np.stack(frames), 1) == rec['segments'][0]['data'], j


def test_composed_video_shows_the_labelled_images_in_order(images):
  src = ImageVideoSource(images, label_key='digit', prompt='Which digits appear, in order?',
                         seed=5, task='video_digits')
  assert len(src) == len(images)
  tok = VideoTokenizer(fps=1.0)
  lengths = set()
  for index in range(12):
    rec = _decode(src[index])
    video, prompt, answer = rec['segments']
    assert (prompt['text'], prompt['predict']) == ('Which digits appear, in order?', False)
    assert answer['predict'] and not video['predict']
    chosen = rec['meta']['image_indices']
    labels = [_decode(images[i])['meta']['digit'] for i in chosen]
    assert answer['text'] == ' '.join(map(str, labels)) and rec['meta']['digits'] == labels
    assert len(set(chosen)) == len(chosen) and 3 <= len(chosen) <= 5
    lengths.add(len(chosen))
    frames = tok.tokenize(video['data'])
    assert frames.num_frames == len(chosen)
    # Each decoded frame is its image (MPEG-4 at quantiser 3: close, not exact).
    first = np.asarray(Image.open(io.BytesIO(_decode(images[chosen[0]])['segments'][0]['data'])).convert('L'))
    decoded = next(av.open(io.BytesIO(video['data'])).decode(video=0))
    assert np.abs(decoded.to_ndarray(format='gray').astype(int) - first).mean() < 4
  assert lengths == {3, 4, 5}
  # A pure function of (seed, index).
  again = ImageVideoSource(images, label_key='digit', prompt='Which digits appear, in order?',
                           seed=5, task='video_digits')
  assert again[7]['record'] == src[7]['record']
  # Kept once composed (frames too); an uncached source gives the same bytes,
  # and a copy for a worker process starts empty.
  assert ('record', 7) in src._cache and any(k[0] == 'frame' for k in src._cache)
  uncached = ImageVideoSource(images, label_key='digit', prompt='Which digits appear, in order?',
                              seed=5, task='video_digits', cache_mb=0)
  assert [uncached[i]['record'] for i in range(12)] == [src[i]['record'] for i in range(12)]
  assert not uncached._cache
  assert pickle.loads(pickle.dumps(src))._cache == {}
  other = ImageVideoSource(images, label_key='digit', prompt='Which digits appear, in order?',
                           seed=6, task='video_digits')
  assert other[7]['record'] != src[7]['record']


def test_errors_name_the_setting(images):
  with pytest.raises(ConfigError, match='prompt'):
    ImageVideoSource(images, label_key='digit', prompt='')
  with pytest.raises(ConfigError, match='compose_frames'):
    ImageVideoSource(images, label_key='digit', prompt='?', frames=(4, 2))
  with pytest.raises(ConfigError, match='fewer than compose_frames'):
    ImageVideoSource(images, label_key='digit', prompt='?', frames=(3, 10 ** 6))
  src = ImageVideoSource(images, label_key='writer', prompt='?')
  item = src[0]
  assert 'error' in item and "no label 'writer'" in item['error'][1]
  with pytest.raises(ConfigError, match=r'compose_frames = \[3\]'):
    pipeline.open_dataset(DatasetConfig(path=f'{SAMPLE}/image_digit-*', kind='image_video',
                                        pair_prompt='?', compose_frames=[3]))


def test_pipeline_opens_the_composed_kind():
  ds = DatasetConfig(path=f'{SAMPLE}/image_digit-*', kind='image_video', pair_prompt='Which?',
                     pair_task='video_digits', compose_frames=[2, 2], compose_fps=2.0,
                     pair_size=40)
  src = pipeline.open_dataset(ds, seed=1)
  assert isinstance(src, ImageVideoSource) and len(src) == 40
  rec = _decode(src[3])
  assert len(rec['meta']['image_indices']) == 2 and rec['meta']['fps'] == 2.0
