"""Training-time media augmentation: random, seeded transforms of decoded pixels
and waveforms, applied before tokenization.

Why each transform exists:

Images (`ImageAugment`). Digits written by different people sit at different
places in the frame, at different sizes and slants, with different pen
pressure and scanner exposure. One random affine map per image covers the
first three (a shift of up to `max_shift` of the side on each axis, an
isotropic `scale`, a rotation about the centre of up to `max_rotation_deg`),
then contrast (about the image mean) and brightness cover the last two. The
area the map uncovers is filled with the median colour of the image border,
because digits come both dark-on-light and light-on-dark: a fixed black fill
would paint black corners onto a white page, a feature no real image has and
one the model could learn to look for.

Audio (`AudioAugment`). The speech data is synthesised with a handful of
espeak voices, but the model must understand real recorded human speech. Each
transform removes one way the synthetic clips are too clean or too uniform:
  - speed: resampling by a factor in `speed` changes tempo and pitch together
    (the speed perturbation of Ko et al. 2015, Kaldi's recipe), so the model
    sees more speaking rates and voice pitches than espeak's few voices have;
  - noise: white or pink (1/f, closer to room and street noise) noise at an
    SNR drawn uniformly in `snr_db`, with probability `p_noise`, so it does
    not rely on a silent background;
  - gain: a level in `gain_db`, since real recordings are quiet or loud;
  - telephone: a 300-3400 Hz band-pass (the ITU-T G.712 voice channel), with
    probability `p_telephone`, so it does not rely on the low fundamental or
    the high fricative energy that a cheap microphone or phone line removes;
  - reverberation: convolution with a synthetic room impulse response
    (exponentially decaying noise whose amplitude falls 60 dB in an RT60
    drawn in `rt60`, Schroeder's statistical model of a diffuse room), with
    probability `p_reverb`, since real speech is recorded in rooms.
The order follows the path of sound: a speaker (speed) in a room (reverb) with
background noise, through a channel (telephone), to a recorder (gain), and
finally the clip is scaled down if it would clip, so it stays in [-1, 1].

Determinism. Every random draw comes from the `np.random.Generator` passed
in; nothing reads global random state. With `augment_rng(seed, stream,
index)` a record's augmentation is a pure function of the run seed, the
dataset/process stream and its position in the shuffled, repeated stream, so
a resumed run sees exactly the augmented examples it would have seen.

Imports numpy, scipy.signal, PIL and gemjax.errors only (no jax: this runs in
Grain worker processes).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from typing import NamedTuple, Sequence

import numpy as np
import scipy.signal
from PIL import Image

from gemjax.errors import BadInputError, ConfigError

# A salt appended to the generator's seed words, so augmentation draws are
# independent of every other coin drawn from (seed, stream, index), e.g.
# condition.drops_condition. 0x6175 = 'au'.
_AUGMENT_SALT = 0x6175

# Telephone channel (ITU-T G.712 voice band).
_PHONE_LOW_HZ = 300.0
_PHONE_HIGH_HZ = 3400.0
_PHONE_ORDER = 4

# How much of the reverberant signal is mixed with the dry one (as a share of
# the RMS level, before the mix is renormalised): from a near microphone to a
# far one.
_REVERB_WET = (0.3, 0.9)
# Amplitude factor per RT60: the reverberant energy falls 60 dB, i.e. the
# amplitude by 10^-3 = exp(-3 ln 10).
_LN_1000 = 3.0 * math.log(10.0)


def augment_rng(seed: int, stream: Sequence[int], index: int) -> np.random.Generator:
  """The generator for one element's augmentation.

  A pure function of the run seed, the stream (which dataset, which process)
  and the element's position in the shuffled, repeated stream (which encodes
  the epoch, so a record is augmented differently each time it comes round,
  and identically after a resume).
  """
  return np.random.default_rng([int(seed), *map(int, stream), int(index), _AUGMENT_SALT])


def _range(owner: str, name: str, value, *, low_min: float | None = None,
           strict: bool = False) -> tuple[float, float]:
  """Checks a (low, high) field and returns it as a tuple of floats."""
  what = f'{owner}.{name} = {value!r}'
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f'{what}: expected a pair of numbers (low, high)') from None
  if not (math.isfinite(low) and math.isfinite(high)):
    raise ConfigError(f'{what}: low and high must be finite numbers')
  if low > high:
    raise ConfigError(f'{what}: low > high; expected low <= high')
  if low_min is not None and (low <= low_min if strict else low < low_min):
    bound = f'> {low_min:g}' if strict else f'>= {low_min:g}'
    raise ConfigError(f'{what}: low must be {bound}')
  return low, high


def _number(owner: str, name: str, value, low: float, high: float) -> float:
  """Checks a scalar field lies in [low, high] (NaN never does)."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f'{owner}.{name} = {value!r}: expected a number') from None
  if not low <= x <= high:
    raise ConfigError(f'{owner}.{name} = {value!r}: expected a number in '
                      f'[{low:g}, {high:g}]')
  return x


class ImageParams(NamedTuple):
  """One draw of `ImageAugment`: what `apply` does to an image.

  angle_deg: rotation about the centre, counter-clockwise as displayed.
  scale: isotropic zoom (> 1 enlarges).
  shift_x, shift_y: translation in pixels (right, down), after rotation/scale.
  contrast: factor on the distance of each value from the image mean.
  brightness: grey levels added (out of 255).
  """
  angle_deg: float
  scale: float
  shift_x: float
  shift_y: float
  contrast: float
  brightness: float


@dataclasses.dataclass(frozen=True)
class ImageAugment:
  """A random affine map, contrast and brightness (see the module docstring).

  max_shift: largest shift, as a fraction of the image side, on each axis.
  scale: (low, high) of the isotropic scale factor.
  max_rotation_deg: largest rotation either way, in degrees.
  contrast: (low, high) of the contrast factor about the image mean.
  brightness: largest brightness change either way, as a fraction of 255.
  """
  max_shift: float = 0.1
  scale: tuple[float, float] = (0.9, 1.1)
  max_rotation_deg: float = 12.0
  contrast: tuple[float, float] = (0.7, 1.3)
  brightness: float = 0.1

  def __post_init__(self):
    # Frozen: coerce lists (from YAML) to tuples of floats so instances hash.
    owner = type(self).__name__
    set_ = functools.partial(object.__setattr__, self)
    set_('max_shift', _number(owner, 'max_shift', self.max_shift, 0.0, 1.0))
    set_('scale', _range(owner, 'scale', self.scale, low_min=0.0, strict=True))
    set_('max_rotation_deg', _number(owner, 'max_rotation_deg', self.max_rotation_deg,
                                     0.0, 180.0))
    set_('contrast', _range(owner, 'contrast', self.contrast, low_min=0.0, strict=True))
    set_('brightness', _number(owner, 'brightness', self.brightness, 0.0, 1.0))

  def draw(self, rng: np.random.Generator, height: int, width: int) -> ImageParams:
    """Draws one set of parameters. Always draws the same six numbers in the
    same order, so a config change never reorders the stream of later draws."""
    angle = rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)
    scale = rng.uniform(*self.scale)
    shift_x = rng.uniform(-self.max_shift, self.max_shift) * width
    shift_y = rng.uniform(-self.max_shift, self.max_shift) * height
    contrast = rng.uniform(*self.contrast)
    brightness = rng.uniform(-self.brightness, self.brightness) * 255.0
    return ImageParams(float(angle), float(scale), float(shift_x), float(shift_y),
                       float(contrast), float(brightness))

  @staticmethod
  def apply(pixels_HxWx3: np.ndarray, params: ImageParams) -> np.ndarray:
    """Applies one drawn set of parameters: uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    if (not isinstance(pixels_HxWx3, np.ndarray) or pixels_HxWx3.dtype != np.uint8
        or pixels_HxWx3.ndim != 3 or pixels_HxWx3.shape[2] != 3
        or pixels_HxWx3.shape[0] == 0 or pixels_HxWx3.shape[1] == 0):
      raise BadInputError('image', 'ImageAugment input',
                          f'{getattr(pixels_HxWx3, "dtype", type(pixels_HxWx3))} array of '
                          f'shape {getattr(pixels_HxWx3, "shape", None)}; expected uint8 '
                          '[H, W, 3] with H, W > 0')
    H, W, _ = pixels_HxWx3.shape
    # The background is what the border mostly is (per channel median), so
    # uncovered area continues the page whatever its colour.
    border_Bx3 = np.concatenate([pixels_HxWx3[0], pixels_HxWx3[-1],
                                 pixels_HxWx3[1:-1, 0], pixels_HxWx3[1:-1, -1]])
    fill = tuple(int(v) for v in np.median(border_Bx3, axis=0).round())

    # Forward map on continuous coordinates (pixel centres at i + 0.5, as PIL
    # samples): p' = c + s R (p - c) + t, with y pointing down, so a positive
    # angle turns the image counter-clockwise as displayed. PIL wants the
    # inverse, p = c + R^T (p' - c - t) / s.
    theta = math.radians(params.angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    inv_2x2 = np.array([[cos, -sin], [sin, cos]]) / params.scale  # (R^T)/s, R = [[c, s], [-s, c]]
    centre_2 = np.array([W / 2.0, H / 2.0])
    offset_2 = centre_2 - inv_2x2 @ (centre_2 + np.array([params.shift_x, params.shift_y]))
    coeffs = (inv_2x2[0, 0], inv_2x2[0, 1], offset_2[0],
              inv_2x2[1, 0], inv_2x2[1, 1], offset_2[1])
    moved = Image.fromarray(pixels_HxWx3, 'RGB').transform(
        (W, H), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
        fillcolor=fill)
    x_HxWx3 = np.asarray(moved, np.float32)

    if params.contrast != 1.0 or params.brightness != 0.0:
      mean = x_HxWx3.mean()
      x_HxWx3 = mean + params.contrast * (x_HxWx3 - mean) + params.brightness
      x_HxWx3 = np.clip(np.rint(x_HxWx3), 0.0, 255.0)
    return x_HxWx3.astype(np.uint8)

  def __call__(self, pixels_HxWx3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3] of the same shape, augmented with
    draws from `rng` only."""
    H, W = np.shape(pixels_HxWx3)[:2]
    return self.apply(pixels_HxWx3, self.draw(rng, H, W))


@functools.lru_cache(maxsize=16)
def _telephone_sos(sample_rate: int) -> np.ndarray:
  """Second-order sections of the telephone band-pass at this sample rate
  (cached: designing the filter costs more than running it on a short clip)."""
  high = min(_PHONE_HIGH_HZ, 0.45 * sample_rate)
  if high <= _PHONE_LOW_HZ:  # a rate too low to have a band above 300 Hz
    return scipy.signal.butter(_PHONE_ORDER, _PHONE_LOW_HZ, btype='highpass',
                               fs=sample_rate, output='sos')
  return scipy.signal.butter(_PHONE_ORDER, [_PHONE_LOW_HZ, high], btype='bandpass',
                             fs=sample_rate, output='sos')


def _rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(x))))


def _noise(n: int, pink: bool, rng: np.random.Generator) -> np.ndarray:
  """Unit-RMS white noise, or pink noise (power ~ 1/f, shaped in the
  frequency domain; the DC bin is zeroed)."""
  white = rng.standard_normal(n)
  if pink and n > 2:
    spectrum = np.fft.rfft(white)
    f = np.arange(spectrum.shape[0], dtype=np.float64)
    f[0] = np.inf
    white = np.fft.irfft(spectrum / np.sqrt(f), n)
  return white / max(_rms(white), 1e-12)


def _room_impulse_response(rt60_s: float, sample_rate: int,
                           rng: np.random.Generator) -> np.ndarray:
  """The reverberant tail of a diffuse room: Gaussian noise under an
  amplitude envelope that falls 60 dB in `rt60_s`, unit energy, cut at RT60."""
  n = max(int(rt60_s * sample_rate), 1)
  t = np.arange(n) / (rt60_s * sample_rate)
  h = rng.standard_normal(n) * np.exp(-_LN_1000 * t)
  return h / max(float(np.sqrt(np.sum(h * h))), 1e-12)


@dataclasses.dataclass(frozen=True)
class AudioAugment:
  """Speed, reverberation, noise, telephone band and gain (see the module
  docstring).

  speed: (low, high) of the resampling factor; > 1 is faster and higher.
  snr_db: (low, high) of the signal-to-noise ratio of added noise.
  p_noise: probability of adding noise.
  gain_db: (low, high) of the level change.
  p_telephone: probability of the 300-3400 Hz band-pass.
  p_reverb: probability of reverberation.
  rt60: (low, high) of the room's reverberation time in seconds.
  """
  speed: tuple[float, float] = (0.85, 1.15)
  snr_db: tuple[float, float] = (5.0, 40.0)
  p_noise: float = 0.5
  gain_db: tuple[float, float] = (-10.0, 6.0)
  p_telephone: float = 0.25
  p_reverb: float = 0.3
  rt60: tuple[float, float] = (0.1, 0.6)

  def __post_init__(self):
    owner = type(self).__name__
    set_ = functools.partial(object.__setattr__, self)
    set_('speed', _range(owner, 'speed', self.speed, low_min=0.0, strict=True))
    set_('snr_db', _range(owner, 'snr_db', self.snr_db))
    set_('p_noise', _number(owner, 'p_noise', self.p_noise, 0.0, 1.0))
    set_('gain_db', _range(owner, 'gain_db', self.gain_db))
    set_('p_telephone', _number(owner, 'p_telephone', self.p_telephone, 0.0, 1.0))
    set_('p_reverb', _number(owner, 'p_reverb', self.p_reverb, 0.0, 1.0))
    set_('rt60', _range(owner, 'rt60', self.rt60, low_min=0.0, strict=True))

  def __call__(self, waveform: np.ndarray, sample_rate: int,
               rng: np.random.Generator) -> np.ndarray:
    """float32 mono [S] in [-1, 1] -> float32 mono [S'] (S' ~ S / speed),
    peak <= 1, never all zeros; draws from `rng` only.

    Raises BadInputError for an empty, non-finite or all-zero clip (there is
    nothing to augment, and the tokenizer rejects silence anyway).
    """
    x = np.asarray(waveform)
    if x.ndim != 1 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
      raise BadInputError('audio', 'AudioAugment input', f'{x.dtype} array of shape '
                          f'{x.shape}; expected a non-empty float mono waveform [S]')
    if int(sample_rate) <= 0:
      raise BadInputError('audio', 'AudioAugment input',
                          f'sample_rate = {sample_rate!r}; expected > 0')
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
      raise BadInputError('audio', 'AudioAugment input', 'waveform contains NaN or inf')
    if not np.any(x):
      raise BadInputError('audio', 'AudioAugment input', 'all-zero waveform')
    sample_rate = int(sample_rate)
    dry = x

    # Every decision is drawn up front in a fixed order, so which transforms
    # fire never shifts the draws of the others.
    speed = rng.uniform(*self.speed)
    use_reverb = rng.random() < self.p_reverb
    rt60_s = rng.uniform(*self.rt60)
    wet = rng.uniform(*_REVERB_WET)
    use_noise = rng.random() < self.p_noise
    snr_db = rng.uniform(*self.snr_db)
    pink = rng.random() < 0.5
    use_phone = rng.random() < self.p_telephone
    gain_db = rng.uniform(*self.gain_db)

    # Speed: play the clip `speed` times faster at the same rate, i.e. resample
    # to S / speed samples. speed ~ p/q -> up q, down p.
    ratio = fractions.Fraction(speed).limit_denominator(50)
    if ratio != 1:
      x = scipy.signal.resample_poly(x, ratio.denominator, ratio.numerator)
      if x.shape[0] == 0:  # a clip of a sample or two, sped up
        x = dry[:1].copy()

    if use_reverb:
      level = _rms(x)
      h = _room_impulse_response(rt60_s, sample_rate, rng)
      tail = scipy.signal.oaconvolve(x, h)[:x.shape[0]]
      tail *= level / max(_rms(tail), 1e-12)
      mixed = math.sqrt(1.0 - wet * wet) * x + wet * tail
      x = mixed * (level / max(_rms(mixed), 1e-12))

    if use_noise:
      noise = _noise(x.shape[0], pink, rng)
      x = x + noise * (_rms(x) * 10.0 ** (-snr_db / 20.0))

    if use_phone:
      x = scipy.signal.sosfilt(_telephone_sos(sample_rate), x)

    x = x * 10.0 ** (gain_db / 20.0)

    peak = float(np.max(np.abs(x)))
    if peak > 1.0:
      x = x / peak
    out = x.astype(np.float32)
    if not np.any(out):  # underflow of a near-silent clip: keep the dry clip
      out = (dry / max(1.0, float(np.max(np.abs(dry))))).astype(np.float32)
    return out


class RecordAugment:
  """The augmenter of one training record (what `SequenceBuilder.build` takes).

  Each image or video frame is augmented with probability `image_p`, each
  audio clip with probability `audio_p`, by `image_aug` / `audio_aug`, all
  from `rng` (one generator per record: `augment_rng(seed, stream, index)`),
  in the order the builder meets the media. Inputs are never modified (they
  may be read-only cached arrays); an input left alone is returned as is.
  """

  def __init__(self, rng: np.random.Generator, *, image_p: float = 0.0,
               audio_p: float = 0.0, image_aug: ImageAugment | None = None,
               audio_aug: AudioAugment | None = None):
    self.rng = rng
    self.image_p = _number('RecordAugment', 'image_p', image_p, 0.0, 1.0)
    self.audio_p = _number('RecordAugment', 'audio_p', audio_p, 0.0, 1.0)
    self.image_aug = image_aug or ImageAugment()
    self.audio_aug = audio_aug or AudioAugment()

  def image(self, pixels_HxWx3: np.ndarray) -> np.ndarray:
    if self.image_p <= 0 or self.rng.random() >= self.image_p:
      return pixels_HxWx3
    return self.image_aug(pixels_HxWx3, self.rng)

  def audio(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    if self.audio_p <= 0 or self.rng.random() >= self.audio_p:
      return waveform
    return self.audio_aug(waveform, sample_rate, self.rng)
