"""Videos of labelled images, composed on the fly.

A video task stored as a few hundred fixed clips ("which digits appear, in
order?") shows a small model each frame combination only once per epoch, and
it memorises them. `ImageVideoSource` makes a fresh video for every index
instead: record i draws n frames (n uniform in [min_frames, max_frames])
without replacement from a labelled image dataset, encodes them as an MP4 at
`fps` frames per second with the encoder the sample corpus uses
(`gemjax.tokenizers.video.encode_mp4`), and asks for the labels in order:

    <video: frame 1 .. frame n> <prompt> <'l1 l2 ... ln'>

with only the answer predicted, so it reads exactly like a stored video
record (meta: `{label_key}s`, the source indices) and evaluates against the
stored test videos. Frames are decoded as grayscale when every channel is
equal, else RGB, and resized (bicubic) to the first frame's size when sizes
differ. Each index is a pure function of (seed, index), so shuffling,
sharding and the checkpointed position work unchanged; `size` is how many
distinct videos form one epoch.

Because a record depends only on its index, the source keeps the records it
composed and the frames it decoded (up to `cache_mb`, per process; 0 turns
this off): later epochs return the same bytes without decoding a PNG or
encoding an MP4.

Compose from a dataset of the same split as the evaluation's videos' own
images and no image crosses splits.

Imports numpy, PIL, gemjax.data.records, gemjax.tokenizers.video (the MP4
encoder) and gemjax.errors.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from gemjax.data import records
from gemjax.errors import BadInputError, ConfigError
from gemjax.tokenizers.video import encode_mp4


class ImageVideoSource:
  """Random-access source of composed video records (see the module doc)."""

  def __init__(self, images, *, label_key: str, prompt: str, frames: tuple[int, int] = (3, 5),
               fps: float = 1.0, size: int = 0, seed: int = 0, task: str = 'video',
               cache_mb: float = 64):
    if not prompt:
      raise ConfigError("a 'image_video' dataset needs a prompt (data.datasets[].pair_prompt)")
    lo, hi = (int(f) for f in frames)
    if not 1 <= lo <= hi:
      raise ConfigError(f'image_video: compose_frames = {list(frames)}; expected '
                        f'[min, max] with 1 <= min <= max')
    if hi > len(images):
      raise ConfigError(f'image_video: {images!r} has {len(images)} records, fewer '
                        f'than compose_frames max {hi} (frames are distinct images)')
    if not fps > 0:
      raise ConfigError(f'image_video: compose_fps = {fps}; must be > 0')
    self.images, self.label_key, self.prompt = images, label_key, prompt
    self.frames, self.fps, self.seed, self.task = (lo, hi), float(fps), seed, task
    self.size = size or len(images)
    self.cache_mb = cache_mb
    self._cache: dict[tuple[str, int], Any] = {}
    self._cache_bytes = 0

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_cache'], state['_cache_bytes'] = {}, 0   # per process
    return state

  def __len__(self) -> int:
    return self.size

  def _cached(self, key: tuple[str, int], make, nbytes):
    """make() once per key while the cache has room (results never change)."""
    hit = self._cache.get(key)
    if hit is not None:
      return hit
    value = make()
    size = nbytes(value)
    if self._cache_bytes + size <= self.cache_mb * 2 ** 20:
      self._cache[key] = value
      self._cache_bytes += size
    return value

  def _frame(self, index: int) -> tuple[np.ndarray, Any]:
    """(uint8 pixels [H, W] or [H, W, 3], label) of image record `index`."""
    return self._cached(('frame', index), lambda: self._decode_frame(index),
                        lambda v: v[0].nbytes)

  def _decode_frame(self, index: int) -> tuple[np.ndarray, Any]:
    item = self.images[index]
    if 'error' in item:
      raise BadInputError(*item['error'][:1], item['where'], item['error'][-1])
    rec = records.decode_record(item['record'], item['where'])
    meta = rec.get('meta') or {}
    if self.label_key not in meta:
      raise BadInputError('record', item['where'], f'meta has no label '
                          f'{self.label_key!r} (keys: {sorted(meta)})')
    segs = [s for s in rec['segments'] if s['kind'] == 'image']
    if len(segs) != 1:
      raise BadInputError('record', item['where'], f'{len(segs)} image segments; a '
                          f'video frame needs exactly one')
    try:
      with Image.open(io.BytesIO(segs[0]['data'])) as im:
        rgb = np.asarray(im.convert('RGB'))
    except Exception as e:  # Pillow signals corrupt data with many types
      raise BadInputError('image', item['where'], f'cannot decode: '
                          f'{type(e).__name__}: {e}') from None
    gray = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    pixels = rgb[..., 0] if gray else rgb
    pixels.flags.writeable = False     # shared between videos
    return pixels, meta[self.label_key]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    return self._cached(('record', index), lambda: self._compose(index),
                        lambda v: len(v.get('record', b'')) + 256)

  def _compose(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, index])
    n = int(rng.integers(self.frames[0], self.frames[1] + 1))
    chosen = [int(i) for i in rng.choice(len(self.images), size=n, replace=False)]
    where = f'image_video[{index}] of {self.images!r}{chosen}'
    try:
      frames, labels = zip(*(self._frame(i) for i in chosen))
    except BadInputError as e:
      return {'where': where, 'error': [e.modality, e.reason]}
    first = frames[0]
    rgb = any(f.ndim == 3 for f in frames)
    out = []
    for f in frames:
      if f.shape[:2] != first.shape[:2]:
        f = np.asarray(Image.fromarray(f).resize((first.shape[1], first.shape[0]),
                                                 Image.Resampling.BICUBIC))
      if rgb and f.ndim == 2:
        f = np.repeat(f[..., None], 3, axis=-1)
      out.append(f)
    composed = {
        'id': f'{self.task}/{index}', 'task': self.task,
        'segments': [
            {'kind': 'video', 'data': encode_mp4(np.stack(out), self.fps), 'format': 'mp4',
             'predict': False},
            {'kind': 'text', 'text': self.prompt, 'predict': False},
            {'kind': 'text', 'text': ' '.join(str(v) for v in labels), 'predict': True}],
        'meta': {f'{self.label_key}s': list(labels), 'fps': self.fps,
                 'image_indices': chosen},
    }
    return {'where': where, 'record': records.encode_record(composed)}

  def __repr__(self):
    return f'ImageVideoSource({self.images!r}, {self.size} videos)'
