"""Host tokenizer throughput on ONE CPU core: images/s, audio s/s, video frames/s.

    python bench/tokenizers_bench.py [--seconds 2]

Inputs are made here (scikit-image sample photos, synthetic audio, a PyAV
encoded clip), so the benchmark needs no network and no data set. The process
is pinned to one core and BLAS/OpenMP pools to one thread, which is what one
Grain worker process gets. Prints a markdown table.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS'):
  os.environ.setdefault(var, '1')

import argparse
import io
import platform
import time

import numpy as np


def pin_one_core() -> str:
  try:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f'cpu {cpu}'
  except (AttributeError, OSError):
    return 'unpinned'


def rate(fn, seconds: float) -> tuple[float, object]:
  """Calls fn until `seconds` have passed (after one warm-up); returns calls/s."""
  out = fn()
  n, start = 0, time.perf_counter()
  while True:
    out = fn()
    n += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return n / elapsed, out


def photo(h: int, w: int, fmt: str) -> bytes:
  from PIL import Image
  from skimage import data
  im = Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, fmt, quality=90) if fmt == 'JPEG' else im.save(buf, fmt)
  return buf.getvalue()


def audio_file(seconds: float, sr: int, fmt: str, channels: int) -> bytes:
  import soundfile as sf
  rng = np.random.default_rng(0)
  t = np.arange(int(seconds * sr)) / sr
  y = 0.2 * np.sin(2 * np.pi * (200 + 50 * t) * t) + 0.02 * rng.normal(size=t.shape)
  y = np.stack([y] * channels, axis=-1)
  buf = io.BytesIO()
  sf.write(buf, y.astype(np.float32), sr, format=fmt)
  return buf.getvalue()


def video_file(seconds: int, rate_fps: int, size: tuple[int, int], codec: str) -> bytes:
  import av
  w, h = size
  from skimage import data
  from PIL import Image
  base = np.asarray(Image.fromarray(data.astronaut()).resize((w + 64, h), Image.BILINEAR))
  buf = io.BytesIO()
  with av.open(buf, 'w', format='mp4') as out:
    vs = out.add_stream(codec, rate=rate_fps)
    vs.width, vs.height, vs.pix_fmt = w, h, 'yuv420p'
    for k in range(seconds * rate_fps):
      img = np.ascontiguousarray(base[:, k % 64:k % 64 + w])  # a panning shot
      for p in vs.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
        out.mux(p)
    for p in vs.encode():
      out.mux(p)
  return buf.getvalue()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seconds', type=float, default=2.0, help='time per row')
  args = parser.parse_args(argv)
  where = pin_one_core()

  from gemjax.data.sequence import SequenceBuilder
  from gemjax.tokenizers import (AudioTokenizer, ByteTokenizer, ImageTokenizer,
                                 VideoTokenizer)

  rows = []  # (what, input, settings, items/s, unit, tokens per item)

  for (h, w), fmt, max_tokens in [((224, 224), 'PNG', 256), ((480, 640), 'JPEG', 256),
                                  ((480, 640), 'JPEG', 1024), ((1080, 1920), 'JPEG', 1024),
                                  ((1080, 1920), 'JPEG', 4096)]:
    tok = ImageTokenizer(patch_size=14, max_tokens=max_tokens)
    data = photo(h, w, fmt)
    r, out = rate(lambda: tok.tokenize(data), args.seconds)
    rows.append(('image', f'{w}x{h} {fmt}', f'p14, max {max_tokens}', r, 'images/s',
                 out.num_tokens))

  audio = AudioTokenizer()
  for seconds, sr, fmt, ch in [(10.0, 16000, 'WAV', 1), (10.0, 44100, 'WAV', 2),
                               (10.0, 44100, 'FLAC', 2)]:
    data = audio_file(seconds, sr, fmt, ch)
    r, out = rate(lambda: audio.tokenize(data), args.seconds)
    rows.append(('audio', f'{seconds:g} s {fmt} {sr // 1000} kHz x{ch}', '25 tok/s',
                 r * seconds, 'audio s/s', out.num_tokens))

  for codec, size in [('libx264', (320, 240)), ('libx264', (640, 480))]:
    seconds, fps_in = 10, 25
    data = video_file(seconds, fps_in, size, codec)
    for fps in (1.0, 4.0):
      vt = VideoTokenizer(fps=fps, max_frames=64, image=ImageTokenizer(max_tokens=256))
      r, out = rate(lambda: vt.tokenize(data), args.seconds)
      rows.append(('video', f'{seconds} s {size[0]}x{size[1]} {codec} {fps_in} fps',
                   f'{fps:g} fps, 256/frame', r * out.num_frames,
                   f'frames/s ({r * seconds * fps_in:.0f} decoded/s)',
                   out.num_tokens // out.num_frames))

  builder = SequenceBuilder(ByteTokenizer(), image=ImageTokenizer(max_tokens=256))
  record = {'segments': [{'kind': 'text', 'text': 'Describe the picture. ' * 4},
                         {'kind': 'image', 'data': photo(480, 640, 'JPEG')},
                         {'kind': 'audio', 'data': audio_file(5.0, 16000, 'WAV', 1)},
                         {'kind': 'text', 'text': 'An astronaut in a suit. ' * 4,
                          'predict': True}]}
  r, ex = rate(lambda: builder.build(record), args.seconds)
  rows.append(('sequence', 'text+640x480 JPEG+5 s WAV+text', 'SequenceBuilder.build',
               r, 'records/s', len(ex['tokens'])))

  print(f'# gemjax tokenizer throughput, one core ({where}), python '
        f'{platform.python_version()}, {platform.machine()}')
  print(f'# command: python bench/tokenizers_bench.py --seconds {args.seconds:g}\n')
  print('| modality | input | settings | throughput | unit | tokens/item |')
  print('|---|---|---|---:|---|---:|')
  for what, inp, settings, r, unit, ntok in rows:
    print(f'| {what} | {inp} | {settings} | {r:.1f} | {unit} | {ntok} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
