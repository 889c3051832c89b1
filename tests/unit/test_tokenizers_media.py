"""Image, audio and video tokenizers: formulas, peer libraries, bad input.

Fixtures are generated here (Pillow, soundfile, PyAV) or are the images that
ship inside scikit-image; nothing comes from the network.
"""

import io
import math
import os

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from gemjax.errors import BadInputError
from gemjax.tokenizers.audio import AudioTokenizer
from gemjax.tokenizers.image import (ImageTokenizer, denormalize, image_grid, normalize,
                                     patchify, unpatchify)
from gemjax.tokenizers.video import VideoTokenizer

SKIMAGE_DATA = os.path.join(os.path.dirname(__import__('skimage.data').data.__file__))


def encode_image(array, fmt='PNG', **kw) -> bytes:
  buf = io.BytesIO()
  (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buf, fmt, **kw)
  return buf.getvalue()


def encode_audio(y, sr=16000, fmt='WAV', subtype=None) -> bytes:
  buf = io.BytesIO()
  sf.write(buf, y, sr, format=fmt, subtype=subtype)
  return buf.getvalue()


def tone(seconds, sr=16000, freq=440.0, amp=0.3):
  t = np.arange(int(seconds * sr)) / sr
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_video(fmt='mp4', codec='mpeg4', frames=30, rate=10, size=(64, 48),
               audio_seconds=None) -> bytes:
  """A small clip whose frame k has a bright column at x = 2k (so frames differ)."""
  w, h = size
  buf = io.BytesIO()
  with av.open(buf, 'w', format=fmt) as out:
    vs = out.add_stream(codec, rate=rate)
    vs.width, vs.height = w, h
    vs.pix_fmt = 'rgb8' if codec == 'gif' else 'yuv420p'
    if audio_seconds:
      aus = out.add_stream('aac', rate=16000)
      aus.layout = 'mono'
    for k in range(frames):
      img = np.full((h, w, 3), 40, np.uint8)
      img[:, (2 * k) % w] = 255
      for packet in vs.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
        out.mux(packet)
    for packet in vs.encode():
      out.mux(packet)
    if audio_seconds:
      y = tone(audio_seconds)
      for start in range(0, len(y), 1024):
        frame = av.AudioFrame.from_ndarray(y[None, start:start + 1024], format='flt',
                                           layout='mono')
        frame.sample_rate, frame.pts = 16000, start
        for packet in aus.encode(frame):
          out.mux(packet)
      for packet in aus.encode():
        out.mux(packet)
  return buf.getvalue()


# ----------------------------------------------------------------- image grid

@pytest.mark.parametrize('hw, p, max_tokens, grid', [
    ((224, 224), 14, 4096, (16, 16)),    # seed: 256 tokens
    ((896, 896), 14, 4096, (64, 64)),    # seed: 4096 tokens
    ((1000, 1000), 14, 4096, (64, 64)),  # larger: downscaled to the cap
    ((4000, 4000), 14, 4096, (64, 64)),
    ((224, 224), 16, 4096, (14, 14)),
    ((896, 896), 16, 4096, (56, 56)),
    ((480, 640), 14, 4096, (34, 46)),    # round(34.29), round(45.71)
    ((3000, 4000), 14, 4096, (55, 73)),  # sqrt(4096 * 3/4) = 55.4, * 4/3 = 73.9
    ((7, 5), 14, 4096, (1, 1)),          # tiny: at least one patch
    ((14, 100000), 14, 4096, (1, 4096)), # extreme aspect ratio: long side capped
])
def test_image_grid_matches_the_seed_examples(hw, p, max_tokens, grid):
  assert image_grid(*hw, patch_size=p, max_tokens=max_tokens) == grid


def test_image_grid_follows_the_documented_formula():
  rng = np.random.default_rng(0)
  for _ in range(500):
    h, w = (int(x) for x in rng.integers(1, 5000, size=2))
    p = int(rng.choice([14, 16]))
    n = int(rng.choice([64, 256, 1024, 4096]))
    rows, cols = image_grid(h, w, p, n)
    assert 1 <= rows * cols <= n
    native = (max(1, math.floor(h / p + 0.5)), max(1, math.floor(w / p + 0.5)))
    if native[0] * native[1] <= n:
      assert (rows, cols) == native
    else:
      s = math.sqrt(n / ((h / p) * (w / p)))
      expect = (max(1, math.floor(h / p * s + 1e-9)), max(1, math.floor(w / p * s + 1e-9)))
      if expect[0] * expect[1] <= n:
        assert (rows, cols) == expect
      if min(rows, cols) >= 4:  # aspect kept to within one patch per side
        assert abs(rows / cols - h / w) <= (h / w) * (1 / rows + 1 / cols) + 1e-9
        assert rows * cols >= n * (1 - 1 / rows - 1 / cols)  # uses the budget


def test_image_token_count_of_real_images():
  tok = ImageTokenizer(patch_size=14, max_tokens=256)
  for name, (h, w) in [('astronaut.png', (512, 512)), ('chelsea.png', (300, 451)),
                       ('rocket.jpg', (427, 640))]:
    out = tok.tokenize(os.path.join(SKIMAGE_DATA, name))
    rows, cols = image_grid(h, w, 14, 256)
    assert out.grid == (rows, cols) and out.num_tokens == rows * cols <= 256
    assert out.patches.shape == (rows * cols, 14 * 14 * 3)
    assert out.patches.dtype == np.float32
    assert -1.0 <= out.patches.min() and out.patches.max() <= 1.0
    np.testing.assert_array_equal(out.positions[:, 0], np.repeat(np.arange(rows), cols))
    np.testing.assert_array_equal(out.positions[:, 1], np.tile(np.arange(cols), rows))


# --------------------------------------------------------- patchify round trip

def test_patchify_unpatchify_round_trip_is_exact():
  x = np.random.default_rng(1).normal(size=(3 * 16, 5 * 16, 3)).astype(np.float32)
  patches, positions = patchify(x, 16)
  assert patches.shape == (15, 16 * 16 * 3)
  np.testing.assert_array_equal(patches[1], x[:16, 16:32].reshape(-1))  # (y, x, c) order
  np.testing.assert_array_equal(unpatchify(patches, positions, 16), x)
  perm = np.random.default_rng(2).permutation(15)  # positions, not order, place patches
  np.testing.assert_array_equal(unpatchify(patches[perm], positions[perm], 16), x)


def test_tokenized_image_unpatchifies_to_the_resized_pixels():
  rng = np.random.default_rng(3)
  img = rng.integers(0, 256, size=(61, 90, 3), dtype=np.uint8)
  tok = ImageTokenizer(patch_size=14, max_tokens=64)
  out = tok.tokenize(encode_image(img))
  rows, cols = out.grid
  expect = np.asarray(Image.fromarray(img).resize((cols * 14, rows * 14), Image.BICUBIC))
  np.testing.assert_array_equal(denormalize(unpatchify(out.patches, out.positions, 14)), expect)
  np.testing.assert_allclose(normalize(expect)[0, 0], expect[0, 0] / 127.5 - 1, atol=1e-6)


def test_exif_orientation_is_applied():
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, :20] = 255  # left half white
  exif = Image.Exif()
  exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to view
  tok = ImageTokenizer(patch_size=10)
  for fmt in ('PNG', 'JPEG'):
    out = tok.tokenize(encode_image(img, fmt, exif=exif))
    assert out.grid == (4, 2)
    pixels = denormalize(unpatchify(out.patches, out.positions, 10))
    assert pixels[:20].mean() > 200 and pixels[20:].mean() < 50  # white went to the top


def test_large_jpeg_fast_path_matches_full_decode():
  # A big JPEG under a small budget decodes in DCT draft mode; the grid must be
  # the full-size one and the pixels close to a full decode + resize.
  big = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, 'astronaut.png')).convert('RGB')
                   .resize((1600, 1200), Image.BICUBIC))
  exif = Image.Exif()
  exif[0x0112] = 6
  data = encode_image(big, 'JPEG', quality=95, exif=exif)
  tok = ImageTokenizer(patch_size=14, max_tokens=64)
  fast = tok.tokenize(data)
  assert fast.grid == image_grid(1600, 1200, 14, 64)  # rotated: 1600 tall
  full = tok.resize_to_grid(tok.decode(data))
  diff = np.abs(denormalize(unpatchify(fast.patches, fast.positions, 14)).astype(float)
                - np.asarray(full, float))
  assert diff.mean() < 4


def test_image_from_path(tmp_path):
  path = tmp_path / 'cat.png'
  path.write_bytes(encode_image(np.zeros((28, 28, 3), np.uint8)))
  assert ImageTokenizer().tokenize(str(path)).grid == (2, 2)
  with pytest.raises(BadInputError) as e:
    ImageTokenizer().tokenize(str(tmp_path / 'missing.png'))
  assert e.value.source.endswith('missing.png')


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG', 'GIF', 'WEBP', 'BMP', 'TIFF'])
def test_every_listed_format_decodes(fmt):
  img = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, 'chelsea.png')).convert('RGB'))[:60, :80]
  out = ImageTokenizer(patch_size=16, max_tokens=64).tokenize(encode_image(img, fmt))
  assert out.grid == image_grid(60, 80, 16, 64)
  assert np.abs(denormalize(unpatchify(out.patches, out.positions, 16)).astype(float)
                - np.asarray(Image.fromarray(img).resize((80, 64), Image.BICUBIC))).mean() < 20


def test_modes_become_rgb_with_alpha_on_the_background():
  tok = ImageTokenizer(patch_size=4, background=(0, 0, 255))
  center = lambda data: denormalize(tok.tokenize(data).patches)[0, :3]
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 255  # red, fully transparent
  assert list(center(encode_image(rgba))) == [0, 0, 255]
  rgba[..., 3] = 255
  assert list(center(encode_image(rgba))) == [255, 0, 0]
  grey_clear = np.stack([np.full((8, 8), 200, np.uint8), np.zeros((8, 8), np.uint8)], -1)
  la = Image.fromarray(grey_clear, 'LA')
  assert list(center(encode_image(la))) == [0, 0, 255]
  pal = Image.new('P', (8, 8), 1)
  pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
  assert list(center(encode_image(pal))) == [10, 20, 30]
  pal.info['transparency'] = 1
  assert list(center(encode_image(pal, transparency=1))) == [0, 0, 255]
  deep = Image.fromarray(np.full((8, 8), 257 * 100, np.uint16))  # I;16: scaled, not clipped
  assert list(center(encode_image(deep))) == [100, 100, 100]
  cmyk = Image.new('CMYK', (8, 8), (0, 255, 255, 0))
  assert list(center(encode_image(cmyk, 'TIFF'))) == [255, 0, 0]
  assert list(center(encode_image(Image.new('1', (8, 8), 1)))) == [255, 255, 255]


def test_decoded_arrays_are_accepted():
  tok = ImageTokenizer(patch_size=4)
  grey = np.full((8, 12), 0.5, np.float32)
  out = tok.tokenize(grey)
  assert out.grid == (2, 3)
  assert set(denormalize(out.patches).ravel().tolist()) == {128}


def image_bad_inputs():
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  good, jpeg = encode_image(pixels), encode_image(pixels, 'JPEG')
  return {
      'truncated png': (good[:len(good) // 2], {}),
      'truncated jpeg': (jpeg[:len(jpeg) // 2], {}),
      'garbage': (b'\x00not an image at all' * 10, {}),
      'zero length': (b'', {}),
      'unsupported format': (encode_image(np.zeros((8, 8, 3), np.uint8), 'PPM'), {}),
      'over pixel limit': (good, {'max_pixels': 64 * 63}),
      'nan array': (np.full((4, 4, 3), np.nan, np.float32), {}),
      'bad array shape': (np.zeros((4, 4, 2), np.uint8), {}),
      'missing file': ('/nonexistent/cat.png', {}),
      'wrong type': (12345, {}),
  }


@pytest.mark.parametrize('case', list(image_bad_inputs()))
def test_bad_images_raise_bad_input_error(case):
  data, settings = image_bad_inputs()[case]
  with pytest.raises(BadInputError) as e:
    ImageTokenizer(**settings).tokenize(data, source=f'shard0:{case}')
  assert e.value.modality == 'image' and e.value.source == f'shard0:{case}'
  assert e.value.reason


def test_decompression_bomb_is_rejected_from_the_header():
  bomb = encode_image(Image.new('1', (12000, 12000)))  # ~30 KB, 144 Mpx
  assert len(bomb) < 100_000
  with pytest.raises(BadInputError, match='max_pixels'):
    ImageTokenizer().tokenize(bomb, source='bomb.png')


# ---------------------------------------------------------------------- audio

@pytest.fixture(scope='module')
def speechlike():
  rng = np.random.default_rng(0)
  sr = 16000
  t = np.arange(int(1.37 * sr)) / sr
  y = 0.2 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.normal(size=t.shape)
  return y.astype(np.float32)


def test_mel_matches_librosa_melspectrogram(speechlike):
  import librosa
  tok = AudioTokenizer()
  ref = librosa.feature.melspectrogram(y=speechlike, sr=16000, n_fft=1024, hop_length=320,
                                       n_mels=128, power=2.0).T
  ours = tok.mel_power(speechlike)
  assert ours.shape == ref.shape == (1 + len(speechlike) // 320, 128)
  # float32 FFTs of different libraries: compare in log space, 1e-3 relative.
  np.testing.assert_allclose(np.log(ours + 1e-8), np.log(ref + 1e-8), atol=1e-3)


def test_audio_patches_are_the_librosa_log_mel_cut_into_patches(speechlike):
  import librosa
  tok = AudioTokenizer()
  out = tok.tokenize(encode_audio(speechlike, subtype='FLOAT'))
  mel = librosa.feature.melspectrogram(y=speechlike, sr=16000, n_fft=1024, hop_length=320,
                                       n_mels=128).T
  log_mel = np.log10(np.maximum(mel, 1e-10))
  log_mel = (np.maximum(log_mel, log_mel.max() - 8) + 4) / 4  # Whisper normalisation
  frames = log_mel.shape[0]
  steps = -(-frames // 4)
  padded = np.full((steps * 4, 128), log_mel.min(), np.float32)
  padded[:frames] = log_mel
  for n in range(out.num_tokens):  # patch n = step n // 2, band n % 2
    j, b = divmod(n, 2)
    expect = padded[4 * j:4 * j + 4, 64 * b:64 * b + 64].reshape(-1)
    np.testing.assert_allclose(out.patches[n], expect, atol=2e-3)
  assert out.num_tokens == steps * 2


def test_audio_rate_is_25_tokens_per_second_with_time_positions():
  tok = AudioTokenizer()
  assert tok.tokens_per_second == 25
  out = tok.tokenize(tone(2.0))
  frames = 1 + 32000 // 320
  assert out.num_tokens == 2 * math.ceil(frames / 4) == 52
  np.testing.assert_allclose(out.times, np.repeat(np.arange(26) * 0.08, 2), atol=1e-6)
  np.testing.assert_array_equal(out.time_positions, np.repeat(np.arange(26) * 2, 2))
  np.testing.assert_array_equal(out.bands, np.tile([0, 1], 26))
  assert out.patches.shape == (52, 256)


@pytest.mark.parametrize('fmt, sr', [('WAV', 16000), ('FLAC', 44100), ('OGG', 22050),
                                     ('MP3', 8000)])
def test_audio_formats_decode_and_resample_to_16k(fmt, sr):
  tok = AudioTokenizer()
  stereo = np.stack([tone(1.0, sr), tone(1.0, sr, freq=880)], axis=-1)
  y = tok.load(encode_audio(stereo, sr, fmt))
  # MP3 adds encoder padding; everything else is exact up to resampling.
  assert abs(len(y) - 16000) <= (2000 if fmt == 'MP3' else 2)
  assert 0.05 < np.abs(y).max() < 0.5  # the mean of two tones, not one channel


def test_audio_array_input_with_its_own_rate():
  tok = AudioTokenizer()
  out = tok.tokenize(tone(1.0, 8000), sample_rate=8000)
  assert out.num_tokens == 2 * math.ceil((1 + 16000 // 320) / 4)
  pcm = (tone(0.5) * 32767).astype(np.int16)  # integer PCM is scaled to [-1, 1)
  assert abs(np.abs(tok.load(pcm)).max() - 0.3) < 1e-3


def audio_bad_inputs():
  return {
      'zero length file': encode_audio(np.zeros(0, np.float32)),
      'zero length bytes': b'',
      'all silent': encode_audio(np.zeros(16000, np.float32)),
      'nan samples': encode_audio(np.array([0.1, np.nan] * 800, np.float32), subtype='FLOAT'),
      'garbage': b'RIFF' + b'\x00' * 200,
      'truncated header': encode_audio(tone(1.0))[:30],
      'image bytes': encode_image(np.zeros((8, 8, 3), np.uint8)),
      'empty array': np.zeros(0, np.float32),
      'missing file': '/nonexistent/a.wav',
  }


@pytest.mark.parametrize('case', list(audio_bad_inputs()))
def test_bad_audio_raises_bad_input_error(case):
  with pytest.raises(BadInputError) as e:
    AudioTokenizer().tokenize(audio_bad_inputs()[case], source=f'rec:{case}')
  assert e.value.modality == 'audio' and e.value.source == f'rec:{case}'


# ---------------------------------------------------------------------- video

@pytest.fixture(scope='module')
def clip_mp4():
  return make_video('mp4', 'mpeg4', frames=30, rate=10)  # 3 s at 10 fps


@pytest.mark.parametrize('fps', [1.0, 2.0, 4.0])
def test_video_frames_sampled_at_fps_with_monotonic_timestamps(clip_mp4, fps):
  out = VideoTokenizer(fps=fps, image=ImageTokenizer(max_tokens=16)).tokenize(clip_mp4)
  expect = np.arange(0, 3.0 - 1e-9, 1 / fps)
  # fps=4 asks for 0.25 s steps from a 10 fps clip: the first frame at or after
  # each grid point (0, 0.3, 0.5, 0.8, ...).
  if fps == 4.0:
    expect = np.ceil(expect * 10 - 1e-6) / 10
  np.testing.assert_allclose(out.times, expect, atol=2e-3)
  assert np.all(np.diff(out.times) > 0)
  np.testing.assert_array_equal(out.time_positions, np.floor(expect * 25 + 0.5))
  assert all(f.grid == image_grid(48, 64, 14, 16) for f in out.frames)


def test_video_frames_are_the_right_frames(clip_mp4):
  vt = VideoTokenizer(fps=1.0, image=ImageTokenizer(patch_size=16, max_tokens=12))
  out = vt.tokenize(clip_mp4)
  for k, frame in enumerate(out.frames):  # frame at t = k s is source frame 10 k
    pixels = denormalize(unpatchify(frame.patches, frame.positions, 16)).mean(axis=(0, 2))
    assert abs(int(np.argmax(pixels)) - (20 * k) % 64) <= 1


def test_video_max_frames_and_fps_above_source_rate(clip_mp4):
  vt = VideoTokenizer(fps=30.0, max_frames=7, image=ImageTokenizer(max_tokens=4))
  out = vt.tokenize(clip_mp4)
  np.testing.assert_allclose(out.times, np.arange(7) / 10, atol=2e-3)  # every source frame


@pytest.mark.parametrize('fmt, codec', [('webm', 'libvpx'), ('gif', 'gif'), ('mp4', 'libx264')])
def test_video_containers_decode(fmt, codec):
  data = make_video(fmt, codec, frames=10, rate=5)
  out = VideoTokenizer(fps=1.0, image=ImageTokenizer(max_tokens=8)).tokenize(data)
  np.testing.assert_allclose(out.times, [0.0, 1.0], atol=2e-3)


def test_video_array_input():
  frames = np.random.default_rng(0).integers(0, 256, (12, 28, 28, 3), dtype=np.uint8)
  out = VideoTokenizer(fps=2.0).tokenize(frames, frame_rate=6.0)
  np.testing.assert_allclose(out.times, [0, 0.5, 1.0, 1.5], atol=1e-6)
  assert out.frames[0].grid == (2, 2)


def test_video_audio_track_shares_the_time_axis():
  data = make_video(frames=30, rate=10, audio_seconds=3.0)
  vt = VideoTokenizer(fps=1.0, max_frames=2, include_audio=True,
                      image=ImageTokenizer(max_tokens=4))
  out = vt.tokenize(data)
  assert out.audio is not None
  np.testing.assert_allclose(out.times, [0, 1], atol=2e-3)
  assert out.audio.times.min() >= 0 and out.audio.times.max() < 2.0  # frames cover [0, 2)
  assert abs(out.audio.num_tokens - 2 * 25) <= 4
  np.testing.assert_array_equal(out.audio.time_positions, np.floor(out.audio.times * 25 + 0.5))
  assert np.all(np.diff(out.audio.times) >= 0)


def video_bad_inputs():
  good = make_video(frames=10, rate=10)
  return {
      'garbage': b'\x00\x01garbage' * 50,
      'zero length': b'',
      'truncated': good[:len(good) // 3],
      'audio only': encode_audio(tone(0.5)),
      'missing file': '/nonexistent/v.mp4',
      'empty array': np.zeros((0, 8, 8, 3), np.uint8),
  }


@pytest.mark.parametrize('case', list(video_bad_inputs()))
def test_bad_video_raises_bad_input_error(case):
  with pytest.raises(BadInputError) as e:
    VideoTokenizer().tokenize(video_bad_inputs()[case], source=f'rec:{case}')
  assert e.value.modality in ('video', 'image') and e.value.source == f'rec:{case}'


def test_video_frames_over_pixel_limit_are_rejected():
  data = make_video(frames=3, rate=10)
  with pytest.raises(BadInputError, match='max_pixels'):
    VideoTokenizer(image=ImageTokenizer(max_pixels=1000)).tokenize(data, source='big.mp4')


def test_video_display_matrix_rotation_is_applied():
  # Phones store portrait video as landscape + a display matrix. Write the
  # matrix of a 90-degree clockwise turn into the mp4 track header ('tkhd').
  buf = io.BytesIO()
  with av.open(buf, 'w', format='mp4') as out:
    vs = out.add_stream('mpeg4', rate=10)
    vs.width, vs.height, vs.pix_fmt = 64, 32, 'yuv420p'
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = 255  # left half white
    for _ in range(3):
      for p in vs.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
        out.mux(p)
    for p in vs.encode():
      out.mux(p)
  data = bytearray(buf.getvalue())
  matrix_at = data.index(b'tkhd') + 4 + 4 + 4 * 5 + 8 + 8  # version..volume, reserved
  data[matrix_at:matrix_at + 36] = np.array(
      [0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000], '>i4').tobytes()
  out = VideoTokenizer(image=ImageTokenizer(patch_size=16, max_tokens=8)).tokenize(bytes(data))
  frame = out.frames[0]
  assert frame.grid == (4, 2)  # displayed portrait: 64 tall, 32 wide
  pixels = denormalize(unpatchify(frame.patches, frame.positions, 16)).astype(float)
  assert pixels[:32].mean() > 200 and pixels[32:].mean() < 60  # left went to the top
