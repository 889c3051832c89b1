"""Audio tokenizer: encoded audio -> 16 kHz mono -> log-mel time x frequency patches.

Decoding: what librosa.load does, without its slow parts. libsndfile
(soundfile, librosa's own first backend) reads WAV, FLAC, OGG (Vorbis/Opus)
and MP3 from bytes or a path; what it cannot read (AAC/M4A, audio tracks of
video files) goes through PyAV instead of librosa's deprecated audioread
fallback. Channels are averaged to mono (librosa.to_mono) and resampled to
`sample_rate` with soxr 'HQ' (librosa's default res_type 'soxr_hq'), called
directly because importing librosa.core JIT-compiles numba code (~14 s on a
cold cache).

Features: the power mel spectrogram of librosa.feature.melspectrogram with the
same settings (centered STFT with zero padding, periodic Hann window, n_fft
1024, hop 320 = 20 ms at 16 kHz, 128 Slaney mel bands), computed here with a
numpy STFT so a test can compare against librosa independently. Normalisation
follows Whisper (Radford et al. 2022): log10(max(mel, 1e-10)), floored at 8
decades (80 dB) below the clip's peak, then (x + 4) / 4.

Patches: the [frames, mels] log-mel is cut into `patch_frames` x `patch_mels`
patches (default 4 frames = 80 ms by 64 mels: 2 frequency bands, 12.5 steps per
second, 25 tokens per second). A last partial time step is padded with the
floor value. Patches are ordered time-major (all bands of step 0, then step 1),
each flattened as (frame, mel) row-major: patch_dim = patch_frames * patch_mels.

Time positions: a patch's time is the centre of its first STFT frame,
j * patch_frames * hop / sample_rate seconds; its integer time position is
floor(time * positions_per_second + 1/2). The same unit (default 25 per
second, i.e. 40 ms) is used for video frame timestamps, so audio and video
tokens of one clip share one time axis in M-RoPE.

Every failure is a `BadInputError('audio', source, reason)`: undecodable or
zero-length data, NaN/inf samples, all-silent audio.

This module imports numpy, soundfile, soxr, librosa.filters, PyAV (lazily) and
gemjax.errors.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any

import numpy as np

from gemjax.errors import BadInputError

DEFAULT_SAMPLE_RATE = 16_000
# Time positions per second of media, shared by audio and video (40 ms units).
DEFAULT_POSITIONS_PER_SECOND = 25
LOG_MEL_FLOOR_DECADES = 8.0


@dataclasses.dataclass
class AudioTokens:
  """One tokenized audio clip.

  patches: [N, patch_frames * patch_mels] float32, time-major then band.
  times: [N] float32 seconds from the start of the clip (plus `start_time`).
  time_positions: [N] int32, round-half-up(times * positions_per_second).
  bands: [N] int32 frequency band of each patch, 0 = lowest.
  num_steps, num_bands: N = num_steps * num_bands.
  """
  patches: np.ndarray
  times: np.ndarray
  time_positions: np.ndarray
  bands: np.ndarray
  num_steps: int
  num_bands: int

  @property
  def num_tokens(self) -> int:
    return self.patches.shape[0]

  def select(self, mask: np.ndarray) -> 'AudioTokens':
    """The patches where `mask` is true (whole time steps keep their bands)."""
    steps = len(np.unique(self.times[mask])) if mask.any() else 0
    return AudioTokens(self.patches[mask], self.times[mask],
                       self.time_positions[mask], self.bands[mask], steps,
                       self.num_bands)


@functools.lru_cache(maxsize=8)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
               fmax: float | None) -> np.ndarray:
  import librosa
  return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels,
                             fmin=fmin, fmax=fmax, htk=False, norm='slaney')


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
  # Periodic Hann (scipy get_window('hann', n, fftbins=True)), as librosa uses.
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def _decode_soundfile(data: Any) -> tuple[np.ndarray, int]:
  import soundfile as sf
  fp = io.BytesIO(data) if isinstance(data, bytes) else data
  y_SxC, sr = sf.read(fp, dtype='float32', always_2d=True)
  return y_SxC.mean(axis=1), int(sr)


def decode_audio_av(container, stream=None) -> tuple[np.ndarray, int, float]:
  """Decodes an audio stream of an open PyAV container.

  Returns (mono float32 waveform at the stream's rate, rate, start time in
  seconds relative to the container's start).
  """
  import av
  stream = stream or container.streams.audio[0]
  rate = stream.rate or stream.codec_context.sample_rate
  resampler = av.AudioResampler(format='fltp', rate=rate)
  chunks, start = [], None
  for frame in container.decode(stream):
    if start is None and frame.time is not None:
      start = float(frame.time)
    for out in resampler.resample(frame):
      chunks.append(out.to_ndarray().mean(axis=0))  # [channels, samples] -> mono
  for out in resampler.resample(None):
    chunks.append(out.to_ndarray().mean(axis=0))
  y = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
  offset = container.start_time / 1e6 if container.start_time is not None else 0.0
  return y, int(rate), max(0.0, (start or 0.0) - offset)


def _decode_av(data: Any) -> tuple[np.ndarray, int]:
  import av
  fp = io.BytesIO(data) if isinstance(data, bytes) else data
  with av.open(fp, mode='r') as container:
    if not container.streams.audio:
      raise ValueError('no audio stream')
    y, sr, _ = decode_audio_av(container)
  return y, sr


@dataclasses.dataclass(frozen=True)
class AudioTokenizer:
  """Settings + methods of the audio tokenizer (picklable, immutable).

  Attributes:
    sample_rate: rate every clip is resampled to (Hz).
    n_fft, hop_length, n_mels, fmin, fmax: the mel spectrogram (librosa names).
    patch_frames, patch_mels: patch size in STFT frames x mel bands.
    positions_per_second: integer time-position units per second.
    max_seconds: clips are truncated to this length (None: no limit).
    silence_threshold: a clip whose peak |sample| is <= this is rejected as
      silent (1e-5 is below one 16-bit quantisation step).
  """
  sample_rate: int = DEFAULT_SAMPLE_RATE
  n_fft: int = 1024
  hop_length: int = 320
  n_mels: int = 128
  fmin: float = 0.0
  fmax: float | None = None
  patch_frames: int = 4
  patch_mels: int = 64
  positions_per_second: int = DEFAULT_POSITIONS_PER_SECOND
  max_seconds: float | None = None
  silence_threshold: float = 1e-5

  def __post_init__(self):
    if self.n_mels % self.patch_mels:
      raise ValueError(f'AudioTokenizer: n_mels={self.n_mels} is not a multiple '
                       f'of patch_mels={self.patch_mels}')
    if min(self.sample_rate, self.n_fft, self.hop_length, self.patch_frames,
           self.positions_per_second) < 1:
      raise ValueError('AudioTokenizer: sizes and rates must be >= 1')

  @property
  def patch_dim(self) -> int:
    return self.patch_frames * self.patch_mels

  @property
  def num_bands(self) -> int:
    return self.n_mels // self.patch_mels

  @property
  def tokens_per_second(self) -> float:
    return self.sample_rate / self.hop_length / self.patch_frames * self.num_bands

  @property
  def step_seconds(self) -> float:
    return self.patch_frames * self.hop_length / self.sample_rate

  def load(self, data: Any, source: str | None = None,
           sample_rate: int | None = None) -> np.ndarray:
    """bytes / path / waveform array -> mono float32 at self.sample_rate.

    A numpy array is a waveform ([S] or [S, channels]) at `sample_rate`
    (default: self.sample_rate).
    """
    if isinstance(data, np.ndarray):
      source = source or '<array>'
      if np.issubdtype(data.dtype, np.integer):  # PCM: full scale -> [-1, 1)
        y = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
      else:
        y = np.asarray(data, np.float32)
      if y.ndim == 2:
        y = y.mean(axis=1)
      elif y.ndim != 1:
        raise BadInputError('audio', source, f'waveform of shape {data.shape}; '
                            f'expected [samples] or [samples, channels]')
      sr = int(sample_rate or self.sample_rate)
    elif isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike)):
      if isinstance(data, (str, os.PathLike)):
        source = source or os.fspath(data)
        data = os.fspath(data)
        if not os.path.isfile(data):
          raise BadInputError('audio', source, 'file not found')
      else:
        source = source or '<bytes>'
        data = bytes(data)
        if not data:
          raise BadInputError('audio', source, 'zero-length data')
      try:
        y, sr = _decode_soundfile(data)
      except Exception as e_sf:  # libsndfile cannot read it: try FFmpeg
        try:
          y, sr = _decode_av(data)
        except Exception as e_av:
          sf_reason = getattr(e_sf, 'error_string', None) or str(e_sf)
          raise BadInputError('audio', source, f'not decodable audio (libsndfile: '
                              f'{sf_reason}; ffmpeg: {type(e_av).__name__}: '
                              f'{e_av})') from None
    else:
      raise BadInputError('audio', source or '<unknown>', f'expected bytes, a path '
                          f'or a waveform array, got {type(data).__name__}')
    self._check(y, source)
    if self.max_seconds is not None:
      y = y[:int(round(self.max_seconds * sr))]
    if sr != self.sample_rate:
      # soxr 'HQ' is what librosa.resample(res_type='soxr_hq') calls; calling it
      # directly skips librosa.core, whose numba JIT costs ~14 s on a cold cache.
      import soxr
      y = soxr.resample(y, sr, self.sample_rate, quality='HQ')
    return np.ascontiguousarray(y, np.float32)

  def _check(self, y: np.ndarray, source: str) -> None:
    if y.size == 0:
      raise BadInputError('audio', source, 'zero-length audio (no samples)')
    if not np.all(np.isfinite(y)):
      raise BadInputError('audio', source, f'{int(np.sum(~np.isfinite(y)))} NaN or '
                          f'inf samples')
    peak = float(np.max(np.abs(y)))
    if peak <= self.silence_threshold:
      raise BadInputError('audio', source, f'all-silent audio (peak |sample| '
                          f'{peak:.3g} <= {self.silence_threshold})')

  def mel_power(self, waveform: np.ndarray) -> np.ndarray:
    """[S] -> [frames, n_mels] power mel; equals melspectrogram(...).T."""
    y = np.asarray(waveform, np.float32)
    pad = self.n_fft // 2
    y = np.pad(y, (pad, pad))  # center=True, pad_mode='constant'
    if y.shape[0] < self.n_fft:
      y = np.pad(y, (0, self.n_fft - y.shape[0]))
    frames_FxN = np.lib.stride_tricks.sliding_window_view(y, self.n_fft)[::self.hop_length]
    spec_FxK = np.fft.rfft(frames_FxN * _hann(self.n_fft), axis=-1)
    power_FxK = (spec_FxK.real ** 2 + spec_FxK.imag ** 2).astype(np.float32)
    basis_MxK = _mel_basis(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)
    return power_FxK @ basis_MxK.T

  def log_mel(self, waveform: np.ndarray) -> np.ndarray:
    """[S] -> [frames, n_mels] normalised log-mel (Whisper normalisation)."""
    return normalize_log_mel(self.mel_power(waveform))

  def tokenize(self, data: Any, source: str | None = None,
               sample_rate: int | None = None) -> AudioTokens:
    """bytes / path / waveform -> AudioTokens (see module docstring)."""
    if source is None and isinstance(data, (str, os.PathLike)):
      source = os.fspath(data)
    source = source or ('<array>' if isinstance(data, np.ndarray) else '<bytes>')
    y = self.load(data, source, sample_rate)
    return self.tokenize_waveform(y, source)

  def tokenize_waveform(self, waveform: np.ndarray, source: str = '<waveform>',
                        start_time: float = 0.0) -> AudioTokens:
    """A mono waveform already at self.sample_rate -> AudioTokens.

    `start_time` (seconds) shifts every patch time, e.g. for the audio track
    of a video that starts after the first frame.
    """
    y = np.asarray(waveform, np.float32)
    self._check(y, source)
    log_mel_FxM = self.log_mel(y)
    F, M = log_mel_FxM.shape
    pf, pm = self.patch_frames, self.patch_mels
    steps, bands = -(-F // pf), M // pm
    if steps * pf != F:  # pad the last partial step with the floor value
      floor = log_mel_FxM.min()
      log_mel_FxM = np.concatenate(
          [log_mel_FxM, np.full((steps * pf - F, M), floor, np.float32)], axis=0)
    x_SxpfxBxpm = log_mel_FxM.reshape(steps, pf, bands, pm)
    patches_NxD = x_SxpfxBxpm.transpose(0, 2, 1, 3).reshape(steps * bands, pf * pm)
    step_of = np.repeat(np.arange(steps), bands)
    times = start_time + step_of * self.step_seconds  # float64 until positions exist
    return AudioTokens(
        patches=np.ascontiguousarray(patches_NxD, np.float32),
        times=times.astype(np.float32),
        time_positions=time_positions(times, self.positions_per_second),
        bands=np.tile(np.arange(bands, dtype=np.int32), steps),
        num_steps=steps, num_bands=bands)


def normalize_log_mel(mel_FxM: np.ndarray) -> np.ndarray:
  """Whisper: log10 with a 1e-10 floor, clipped 8 decades under the peak, (x+4)/4."""
  log_mel = np.log10(np.maximum(mel_FxM, 1e-10))
  log_mel = np.maximum(log_mel, log_mel.max() - LOG_MEL_FLOOR_DECADES)
  return ((log_mel + 4.0) / 4.0).astype(np.float32)


def time_positions(times_s: np.ndarray, positions_per_second: int) -> np.ndarray:
  """Seconds -> integer time positions, floor(t * positions_per_second + 1/2).

  Half-up rather than numpy's half-to-even, so that a regular grid of times
  (0.5 s frames at 25 per second: 0, 13, 25, 38, ...) stays evenly spaced.
  """
  x = np.asarray(times_s, np.float64) * positions_per_second
  return np.floor(x + 0.5).astype(np.int32)
