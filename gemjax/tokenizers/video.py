"""Video tokenizer: encoded video -> sampled frames -> per-frame image patches.

Decoding: PyAV (FFmpeg) reads MP4/MOV, WebM/MKV and animated GIF from bytes or
a path; a decoded array [F, H, W, 3] with its frame rate is accepted too.

Sampling: frames are taken at `fps` frames per second of media time. The k-th
sample is the first decoded frame whose timestamp is >= k / fps (1 ms slack
for rounding in container time bases); after a frame at time t is taken, the
next target is the first grid point k / fps strictly after t. So a 30 fps clip
at fps = 1 yields frames at 0, 1, 2 ... s and a 5 fps clip sampled at 10 fps
yields every frame. At most `max_frames` frames are kept (from the start).

Each frame is turned upright (display-matrix rotation, as phones record
portrait video), resized with the image rule of `gemjax.tokenizers.image`
under its own budget (`image.max_tokens`, 256 by default) and patched like an
image. Timestamps are seconds from the container start; time positions use the
audio tokenizer's unit (floor(t * positions_per_second + 1/2)), so with
`include_audio` the audio track's patches (seconds from the same origin) line
up with the frames. The audio kept is the span the sampled frames cover:
[0, last frame + 1/fps).

Failures are `BadInputError('video', source, reason)`: unreadable container,
no video stream, no decodable frame, frames over the pixel limit, a broken
audio track when include_audio is set. A silent or empty audio track is not an
error: the video is returned without audio.

This module imports numpy, PyAV (lazily), the image and audio tokenizers and
gemjax.errors.
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import math
import os
import threading
from typing import Any

import numpy as np

from gemjax.errors import BadInputError
from gemjax.tokenizers.audio import AudioTokenizer, AudioTokens, decode_audio_av, time_positions
from gemjax.tokenizers.image import ImageTokenizer, ImageTokens

_SLACK_S = 1e-3  # container time bases are rational; 1 ms absorbs rounding
_local = threading.local()   # per-thread swscale reformatter (_frame_pixels)


def _default_frame_tokenizer() -> ImageTokenizer:
  return ImageTokenizer(max_tokens=256)


@dataclasses.dataclass
class VideoTokens:
  """One tokenized video.

  frames: one ImageTokens per sampled frame.
  times: [F] float32 seconds of each frame from the container start.
  time_positions: [F] int32, the audio tokenizer's `time_positions(times)`.
  audio: the audio track's tokens (times on the same axis) or None.
  """
  frames: list[ImageTokens]
  times: np.ndarray
  time_positions: np.ndarray
  audio: AudioTokens | None = None

  @property
  def num_frames(self) -> int:
    return len(self.frames)

  @property
  def num_tokens(self) -> int:
    n = sum(f.num_tokens for f in self.frames)
    return n + (self.audio.num_tokens if self.audio is not None else 0)


@dataclasses.dataclass
class DecodedVideo:
  """A decoded video before patching (`VideoTokenizer.decode`).

  pixels: per sampled frame, upright RGB uint8 [h, w, 3] at its grid size.
  times: [F] float64 seconds of each frame from the container start.
  audio: the audio track's tokens or None.
  """
  pixels: tuple[np.ndarray, ...]
  times: np.ndarray
  audio: AudioTokens | None = None


class _FrameSampler:
  """Keeps the first frame at or after each point of the k / fps grid."""

  def __init__(self, fps: float, max_frames: int):
    self.fps, self.max_frames = fps, max_frames
    self.next_t = 0.0
    self.count = 0

  @property
  def full(self) -> bool:
    return self.count >= self.max_frames

  def take(self, t: float) -> bool:
    if self.full or t + _SLACK_S < self.next_t:
      return False
    self.count += 1
    self.next_t = (math.floor(t * self.fps + _SLACK_S * self.fps) + 1) / self.fps
    return True


@dataclasses.dataclass(frozen=True)
class VideoTokenizer:
  """Settings + methods of the video tokenizer (picklable, immutable).

  Attributes:
    fps: frames sampled per second of video.
    max_frames: at most this many frames (the first ones) are kept.
    image: the per-frame image tokenizer; its max_tokens is the per-frame
      token budget (256 by default) and max_pixels the per-frame limit.
    include_audio: also tokenize the audio track (if any) with `audio`.
    audio: the audio tokenizer; its positions_per_second is the time unit.
  """
  fps: float = 1.0
  max_frames: int = 32
  image: ImageTokenizer = dataclasses.field(default_factory=_default_frame_tokenizer)
  include_audio: bool = False
  audio: AudioTokenizer = dataclasses.field(default_factory=AudioTokenizer)

  def __post_init__(self):
    if not self.fps > 0 or self.max_frames < 1:
      raise ValueError(f'VideoTokenizer: fps must be > 0 and max_frames >= 1, got '
                       f'{self.fps}, {self.max_frames}')

  @property
  def patch_dim(self) -> int:
    return self.image.patch_dim

  @property
  def positions_per_second(self) -> int:
    return self.audio.positions_per_second

  def tokenize(self, data: Any, source: str | None = None,
               frame_rate: float | None = None, frame_transform=None) -> VideoTokens:
    """bytes / path / array [F, H, W, 3] (+ its frame_rate) -> VideoTokens.

    `frame_transform(uint8 [h, w, 3]) -> uint8 [h, w, 3]` (e.g. training
    augmentation) is applied to each sampled frame at its grid size, before
    patching.
    """
    return self.tokenize_decoded(self.decode(data, source, frame_rate), frame_transform)

  def decode(self, data: Any, source: str | None = None,
             frame_rate: float | None = None) -> DecodedVideo:
    """bytes / path / array [F, H, W, 3] (+ its frame_rate) -> the sampled
    frames as RGB pixels at their grid size (upright), their times and (with
    include_audio) the audio tokens: all of `tokenize` but the patching, so
    that a caller can keep the decoded video and tokenize it many times with
    different frame transforms."""
    if isinstance(data, np.ndarray):
      return self._sample_frames(data, frame_rate, source or '<array>')
    source, data = self._check_encoded(data, source)
    pixels, times = self._decode_frames(data, source)
    audio = self._decode_audio(data, source, times) if self.include_audio else None
    return DecodedVideo(tuple(pixels), times, audio)

  def tokenize_decoded(self, decoded: DecodedVideo, frame_transform=None) -> VideoTokens:
    """`decode`'s result -> VideoTokens, each frame through `frame_transform`."""
    frames = []
    for rgb_HxWx3 in decoded.pixels:
      if frame_transform is not None:
        rgb_HxWx3 = frame_transform(rgb_HxWx3)
      frames.append(self.image.tokenize_resized(rgb_HxWx3))
    return self._video_tokens(frames, decoded.times, decoded.audio)

  @staticmethod
  def _check_encoded(data, source: str | None) -> tuple[str, bytes | str]:
    if isinstance(data, (str, os.PathLike)):
      source = source or os.fspath(data)
      data = os.fspath(data)
      if not os.path.isfile(data):
        raise BadInputError('video', source, 'file not found')
    elif isinstance(data, (bytes, bytearray, memoryview)):
      source = source or '<bytes>'
      data = bytes(data)
      if not data:
        raise BadInputError('video', source, 'zero-length data')
    else:
      raise BadInputError('video', source or '<unknown>', f'expected bytes, a path '
                          f'or a frame array, got {type(data).__name__}')
    return source, data

  def _video_tokens(self, frames, times, audio=None) -> VideoTokens:
    # Positions from float64 times: a float32 1.3 s is 32.4999 units, not 32.5.
    times = np.asarray(times, np.float64)
    return VideoTokens(frames, times.astype(np.float32),
                       time_positions(times, self.positions_per_second), audio)

  def _open(self, data):
    import av
    return av.open(io.BytesIO(data) if isinstance(data, bytes) else data, mode='r')

  def _decode_frames(self, data, source: str) -> tuple[list[np.ndarray], np.ndarray]:
    sampler = _FrameSampler(self.fps, self.max_frames)
    frames, times = [], []
    try:
      with self._open(data) as container:
        if not container.streams.video:
          raise BadInputError('video', source, 'no video stream')
        stream = container.streams.video[0]
        origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        for index, frame in enumerate(container.decode(stream)):
          t = (float(frame.time) - origin) if frame.time is not None else index / rate
          if not sampler.take(max(t, 0.0)):
            if sampler.full:
              break
            continue
          frames.append(self._frame_pixels(frame, source))
          times.append(max(t, 0.0))
    except BadInputError:
      raise
    except Exception as e:  # FFmpeg reports corrupt data with many error types
      raise BadInputError('video', source, f'cannot decode: {type(e).__name__}: '
                          f'{e}') from None
    if not frames:
      raise BadInputError('video', source, 'no decodable video frames')
    return frames, np.asarray(times, np.float64)

  def _frame_pixels(self, frame, source: str) -> np.ndarray:
    """A decoded frame -> upright RGB uint8 [h, w, 3] at its grid size."""
    w, h = frame.width, frame.height
    if w * h > self.image.max_pixels:
      raise BadInputError('video', source, f'{w}x{h} frames are over the limit '
                          f'max_pixels={self.image.max_pixels}')
    # Phones store portrait video as landscape plus a display matrix; PyAV
    # gives its angle counterclockwise, which is np.rot90's direction.
    quarter_turns = round((getattr(frame, 'rotation', 0) or 0) / 90) % 4
    if quarter_turns % 2:
      w, h = h, w
    rows, cols = self.image.grid(h, w)
    p = self.image.patch_size
    th, tw = rows * p, cols * p
    if quarter_turns % 2:
      th, tw = tw, th
    # swscale resizes and converts to RGB in one pass (faster than via PIL).
    # Setting up its context costs more than converting a small frame, so each
    # thread keeps one reformatter (it reuses the context while the sizes
    # and formats stay the same; the pixels are identical either way).
    reformatter = getattr(_local, 'reformatter', None)
    if reformatter is None:
      from av.video.reformatter import VideoReformatter
      reformatter = _local.reformatter = VideoReformatter()
    rgb_HxWx3 = reformatter.reformat(frame, width=tw, height=th, format='rgb24',
                                     interpolation='BICUBIC').to_ndarray()
    if quarter_turns:
      rgb_HxWx3 = np.ascontiguousarray(np.rot90(rgb_HxWx3, quarter_turns))
    return rgb_HxWx3

  def _decode_audio(self, data, source: str, frame_times: np.ndarray) -> AudioTokens | None:
    try:
      with self._open(data) as container:
        if not container.streams.audio:
          return None
        y, sr, start = decode_audio_av(container)
    except Exception as e:
      raise BadInputError('video', source, f'audio track: cannot decode: '
                          f'{type(e).__name__}: {e}') from None
    end = float(frame_times[-1]) + 1.0 / self.fps
    # Cut before resampling: only the span the sampled frames cover is used.
    y = y[:max(0, int(math.ceil((end - start) * sr)))]
    try:
      y = self.audio.load(y, source, sample_rate=sr)
      tokens = self.audio.tokenize_waveform(y, source, start_time=start)
    except BadInputError:  # silent or empty track: a video without sound
      return None
    return tokens.select(tokens.times < end)

  def tokenize_frames(self, frames_FxHxWx3: np.ndarray, frame_rate: float | None,
                      source: str = '<array>', frame_transform=None) -> VideoTokens:
    """Already-decoded frames [F, H, W, 3] at `frame_rate` (default: self.fps)."""
    return self.tokenize(np.asarray(frames_FxHxWx3), source, frame_rate, frame_transform)

  def _sample_frames(self, a: np.ndarray, frame_rate: float | None,
                     source: str) -> DecodedVideo:
    if a.ndim != 4 or a.shape[0] < 1:
      raise BadInputError('video', source, f'frame array of shape {a.shape}; '
                          f'expected [F, H, W, 3] with F >= 1')
    rate = float(frame_rate or self.fps)
    sampler = _FrameSampler(self.fps, self.max_frames)
    pixels, times = [], []
    for k in range(a.shape[0]):
      t = k / rate
      if not sampler.take(t):
        if sampler.full:
          break
        continue
      pixels.append(np.asarray(self.image.resize_to_grid(self.image.decode(a[k], source))))
      times.append(t)
    return DecodedVideo(tuple(pixels), np.asarray(times, np.float64))


def encode_mp4(frames_FxHxW: np.ndarray, fps: float = 1.0) -> bytes:
  """Gray uint8 frames [F, H, W] (or RGB [F, H, W, 3]) -> MP4 bytes.

  MPEG-4 Part 2 (FFmpeg's own `mpeg4` encoder inside PyAV) at quantiser 3,
  single-threaded, yuv420p. Not H.264: libx264 gave different bytes for the
  same frames in different processes (28 pixels is not a multiple of its
  16-pixel macroblocks), and the sample corpus (scripts/build_sample_corpus.py)
  and the videos composed in training (gemjax/data/compose.py) must come out
  byte-identical for identical frames.
  """
  import av

  a = np.asarray(frames_FxHxW)
  if a.ndim == 3:
    a = np.repeat(a[..., None], 3, axis=-1)
  if a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] < 1 or a.dtype != np.uint8:
    raise ValueError(f'encode_mp4: expected uint8 frames [F, H, W] or [F, H, W, 3] '
                     f'with F >= 1, got {a.dtype} {a.shape}')
  rate = fractions.Fraction(fps).limit_denominator(1001)
  buf = io.BytesIO()
  with av.open(buf, mode='w', format='mp4') as container:
    stream = container.add_stream('mpeg4', rate=rate)
    stream.width, stream.height = a.shape[2], a.shape[1]
    stream.pix_fmt = 'yuv420p'
    stream.options = {'qscale': '3'}
    stream.codec_context.thread_count = 1
    for frame in a:
      for packet in stream.encode(av.VideoFrame.from_ndarray(
          np.ascontiguousarray(frame), format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buf.getvalue()
