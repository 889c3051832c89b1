"""gemjax.data.augment: seeded image and audio augmentation.

References are independent of the code under test: ink centroids and affine
geometry for images; the FFT peak, RMS ratios and tone attenuation for audio.
"""

import math

import numpy as np
import pytest

from gemjax.data import augment
from gemjax.data.augment import AudioAugment, ImageAugment

SR = 16_000
# Only the transform a test is about is enabled.
_QUIET = dict(speed=(1.0, 1.0), p_noise=0.0, gain_db=(0.0, 0.0), p_telephone=0.0,
              p_reverb=0.0)
_STILL = dict(max_shift=0.0, scale=(1.0, 1.0), max_rotation_deg=0.0, contrast=(1.0, 1.0),
              brightness=0.0)


def _digit(background: int, ink: int) -> np.ndarray:
  """A 28x28 'digit': a thick off-centre L stroke, so rotation is visible."""
  img = np.full((28, 28, 3), background, np.uint8)
  img[7:21, 9:13] = ink
  img[17:21, 9:19] = ink
  return img


def _ink_centroid(img_HxWx3: np.ndarray, background: int) -> np.ndarray:
  """(x, y) centre of ink mass in continuous coordinates (pixel centres at +0.5)."""
  mass_HxW = np.abs(img_HxWx3[..., 0].astype(np.float64) - background)
  ys, xs = np.mgrid[:mass_HxW.shape[0], :mass_HxW.shape[1]] + 0.5
  return np.array([(xs * mass_HxW).sum(), (ys * mass_HxW).sum()]) / mass_HxW.sum()


def _tone(hz: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
  t = np.arange(int(seconds * SR)) / SR
  return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _db(a: np.ndarray, b: np.ndarray) -> float:
  """Power of a over power of b, in dB."""
  return 10 * math.log10(np.mean(np.square(a, dtype=np.float64))
                         / np.mean(np.square(b, dtype=np.float64)))


def test_augment_rng_is_a_pure_function_of_seed_stream_and_index():
  a = augment.augment_rng(7, (1, 2), 30).random(4)
  np.testing.assert_array_equal(a, augment.augment_rng(7, (1, 2), 30).random(4))
  np.testing.assert_array_equal(a, np.random.default_rng([7, 1, 2, 30, 0x6175]).random(4))
  assert not np.array_equal(a, augment.augment_rng(7, (1, 2), 31).random(4))
  assert not np.array_equal(a, augment.augment_rng(7, (1, 3), 30).random(4))


def test_image_same_seed_same_output_other_seed_differs_shape_dtype_kept():
  aug, img = ImageAugment(), _digit(0, 255)
  out = aug(img, np.random.default_rng(1))
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, aug(img, np.random.default_rng(1)))
  assert not np.array_equal(out, aug(img, np.random.default_rng(2)))
  rect = np.random.default_rng(0).integers(0, 256, (17, 40, 3), dtype=np.uint8)
  out = aug(rect, np.random.default_rng(3))
  assert out.shape == (17, 40, 3) and out.dtype == np.uint8


def test_image_degenerate_ranges_are_the_identity():
  img = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
  out = ImageAugment(**_STILL)(img, np.random.default_rng(5))
  assert np.max(np.abs(out.astype(int) - img.astype(int))) <= 1


@pytest.mark.parametrize('background, ink', [(255, 0), (0, 255)])
def test_image_fill_matches_background_not_black(background, ink):
  # A large move uncovers the corners; they must continue the page, whether
  # it is light (black PIL default fill would show) or dark.
  img = np.full((28, 28, 3), background, np.uint8)
  img[10:18, 10:18] = ink
  aug = ImageAugment(max_shift=0.25, scale=(1.0, 1.0), max_rotation_deg=45.0,
                     contrast=(1.0, 1.0), brightness=0.0)
  for seed in range(10):
    out = aug(img, np.random.default_rng(seed))
    assert not np.array_equal(out, img)
    for corner in (out[:3, :3], out[:3, -3:], out[-3:, :3], out[-3:, -3:]):
      np.testing.assert_array_equal(corner, background)


def test_image_shift_moves_ink_centroid_by_the_drawn_shift():
  aug = ImageAugment(max_shift=0.15, scale=(1.0, 1.0), max_rotation_deg=0.0,
                     contrast=(1.0, 1.0), brightness=0.0)
  img = _digit(0, 255)
  params = aug.draw(np.random.default_rng(11), 28, 28)
  assert math.hypot(params.shift_x, params.shift_y) > 1.5  # a real move, not ~0
  out = aug(img, np.random.default_rng(11))
  moved = _ink_centroid(out, 0) - _ink_centroid(img, 0)
  np.testing.assert_allclose(moved, [params.shift_x, params.shift_y], atol=0.1)


def test_image_affine_maps_ink_centroid_like_the_drawn_affine():
  # The centroid of a density moves with an affine map: c' = C + s R (c - C) + t,
  # positive angle counter-clockwise as displayed (y down). Bilinear
  # resampling is only approximately mass-preserving under rotation/scale.
  aug = ImageAugment(max_shift=0.1, scale=(0.8, 1.2), max_rotation_deg=30.0,
                     contrast=(1.0, 1.0), brightness=0.0)
  img = _digit(255, 0)
  for seed in (3, 4, 5):
    p = aug.draw(np.random.default_rng(seed), 28, 28)
    out = aug(img, np.random.default_rng(seed))
    th = math.radians(p.angle_deg)
    rot = np.array([[math.cos(th), math.sin(th)], [-math.sin(th), math.cos(th)]])
    centre = np.array([14.0, 14.0])
    want = centre + p.scale * rot @ (_ink_centroid(img, 255) - centre) + [p.shift_x, p.shift_y]
    np.testing.assert_allclose(_ink_centroid(out, 255), want, atol=0.3)


def test_image_contrast_and_brightness_follow_the_draw():
  aug = ImageAugment(max_shift=0.0, scale=(1.0, 1.0), max_rotation_deg=0.0,
                     contrast=(0.5, 1.5), brightness=0.2)
  img = np.random.default_rng(0).integers(60, 200, (28, 28, 3), dtype=np.uint8)
  p = aug.draw(np.random.default_rng(9), 28, 28)
  out = aug(img, np.random.default_rng(9))
  x = img.astype(np.float64)
  want = np.clip(x.mean() + p.contrast * (x - x.mean()) + p.brightness, 0, 255)
  assert np.max(np.abs(out - want)) <= 1.0


def test_audio_same_seed_same_output_other_seed_differs():
  aug, x = AudioAugment(), _tone(440.0)
  outs = [aug(x, SR, np.random.default_rng(s)) for s in (1, 1, 2)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert outs[0].shape != outs[2].shape or not np.array_equal(outs[0], outs[2])


def test_audio_speed_shortens_clip_and_raises_pitch():
  out = AudioAugment(**dict(_QUIET, speed=(1.1, 1.1)))(_tone(1000.0), SR,
                                                        np.random.default_rng(0))
  assert abs(out.shape[0] - SR / 1.1) <= 1
  spectrum = np.abs(np.fft.rfft(out * np.hanning(out.shape[0])))
  peak_hz = np.argmax(spectrum) * SR / out.shape[0]
  assert abs(peak_hz - 1100.0) < 3.0, peak_hz


@pytest.mark.parametrize('seed', [0, 1, 2, 3])  # white and pink both come up
def test_audio_noise_has_the_drawn_snr(seed):
  x = _tone(440.0, amplitude=0.2)
  out = AudioAugment(**dict(_QUIET, p_noise=1.0, snr_db=(20.0, 20.0)))(
      x, SR, np.random.default_rng(seed))
  assert out.shape == x.shape
  assert abs(_db(x, out - x) - 20.0) < 1.0


def test_audio_telephone_band_passes_300_to_3400_hz():
  aug = AudioAugment(**dict(_QUIET, p_telephone=1.0))
  settled = slice(SR // 4, None)  # skip the filter's start-up transient
  def gain_db(hz):
    x = _tone(hz)
    return _db(aug(x, SR, np.random.default_rng(0))[settled], x[settled])
  assert gain_db(100.0) < -10.0
  assert gain_db(6000.0) < -10.0
  assert abs(gain_db(1000.0)) < 1.0


def test_audio_reverb_keeps_length_and_level_and_adds_a_tail():
  aug = AudioAugment(**dict(_QUIET, p_reverb=1.0, rt60=(0.3, 0.3)))
  x = _tone(300.0, amplitude=0.3)
  x[SR // 2:] = 0.0  # the tone stops half way: a room keeps it ringing
  out = aug(x, SR, np.random.default_rng(0))
  assert out.shape == x.shape
  assert abs(_db(out, x)) < 0.1
  ring = out[SR // 2:SR // 2 + SR // 20]  # the first 50 ms after the tone stops
  assert np.sqrt(np.mean(ring.astype(np.float64) ** 2)) > 1e-3


def test_audio_peak_never_above_one_and_never_silent():
  aug = AudioAugment(gain_db=(6.0, 6.0))
  x = _tone(220.0, amplitude=1.0)
  for seed in range(8):
    out = aug(x, SR, np.random.default_rng(seed))
    assert out.dtype == np.float32
    assert np.max(np.abs(out)) <= 1.0 and np.any(out)


def test_audio_silent_input_is_a_bad_input():
  with pytest.raises(ValueError, match='all-zero'):
    AudioAugment()(np.zeros(100, np.float32), SR, np.random.default_rng(0))


@pytest.mark.parametrize('cls, field, value', [
    (ImageAugment, 'max_shift', -0.1),
    (ImageAugment, 'scale', (1.2, 0.9)),
    (ImageAugment, 'scale', (0.0, 1.0)),
    (ImageAugment, 'max_rotation_deg', -5.0),
    (ImageAugment, 'contrast', (1.3, 0.7)),
    (ImageAugment, 'brightness', float('nan')),
    (AudioAugment, 'speed', (0.0, 1.1)),
    (AudioAugment, 'snr_db', (40.0, 5.0)),
    (AudioAugment, 'p_noise', 1.5),
    (AudioAugment, 'p_telephone', -0.1),
    (AudioAugment, 'p_reverb', 2.0),
    (AudioAugment, 'gain_db', (6.0, -10.0)),
    (AudioAugment, 'rt60', (0.0, 0.6)),
    (AudioAugment, 'rt60', (-0.1, 0.6)),
])
def test_validation_error_names_the_field_and_value(cls, field, value):
  with pytest.raises(ValueError, match=rf'{cls.__name__}\.{field} = ') as e:
    cls(**{field: value})
  assert repr(value) in str(e.value)
