"""Benchmark of the Grain data pipeline on the bundled sample corpus.

    python bench/pipeline.py [--workers 0 1 2] [--seconds 10] [--seq-len 1024]
                             [--batch-size 8] [--json out.json]

For each mixture and worker count: examples/s, tokens/s (non-padding tokens
leaving the pipeline) and the packing efficiency (non-padding fraction of the
[B, T] rows). Time starts after a warm-up of a few batches, so worker start-up
is not counted. The real SequenceBuilder with the byte tokenizer does the
decoding, as in a CPU training run.

Mixtures (train split of data/sample):
  multimodal  all six tasks, equal weights per example
  text_heavy  text_lm 0.8, image_digit 0.1, speech_digit 0.1

Imports gemjax.data and gemjax.tokenizers only.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from gemjax.data import pipeline  # noqa: E402
from gemjax.data.sequence import SequenceBuilder  # noqa: E402
from gemjax.tokenizers.text import ByteTokenizer  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), '..', 'data', 'sample', 'train')
MIXTURES = {
    'multimodal': {'image_digit': 1, 'speech_digit': 1, 'same_digit': 1,
                   'video_digits': 1, 'photo_caption': 1, 'text_lm': 1},
    'text_heavy': {'text_lm': 0.8, 'image_digit': 0.1, 'speech_digit': 0.1},
}
BUDGETS = {'image': 96, 'audio': 160, 'video': 96}


def run(mixture: str, workers: int, seconds: float, seq_len: int, batch_size: int,
        warmup: int = 3) -> dict:
  builder = SequenceBuilder(ByteTokenizer())
  settings = pipeline.DataSettings(
      datasets=tuple(pipeline.DatasetSpec(os.path.join(SAMPLE, f'{task}-*'), weight=w)
                     for task, w in MIXTURES[mixture].items()),
      patch_budgets=BUDGETS, patch_dims=builder.patch_dims, num_workers=workers,
      worker_buffer=2, read_threads=1)
  it = pipeline.make_train_iterator(settings, builder, seq_len=seq_len,
                                    batch_size=batch_size, seed=0)
  try:
    t_start = time.perf_counter()
    for _ in range(warmup):
      next(it)
    first_batch_s = time.perf_counter() - t_start
    s0 = it.stats
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
      next(it)
      n += 1
    dt = time.perf_counter() - t0
    s1 = it.stats
  finally:
    it.close()
  tokens = s1['tokens'] - s0['tokens']
  return {
      'mixture': mixture, 'workers': workers, 'batches': n,
      'batches_per_s': n / dt,
      'examples_per_s': (s1['examples'] - s0['examples']) / dt,
      'tokens_per_s': tokens / dt,
      'packing_efficiency': tokens / (s1['capacity'] - s0['capacity']),
      'dropped': s1['dropped'], 'bad': s1['bad'],
      'warmup_s': first_batch_s,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--mixtures', nargs='+', default=list(MIXTURES))
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--seq-len', type=int, default=1024)
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args(argv)
  results = []
  print(f'T={args.seq_len} B={args.batch_size} budgets={BUDGETS} cpus={os.cpu_count()}')
  print('| mixture | workers | examples/s | tokens/s | batches/s | packing efficiency | warm-up s |')
  print('|---|---|---|---|---|---|---|')
  for mixture in args.mixtures:
    for workers in args.workers:
      r = run(mixture, workers, args.seconds, args.seq_len, args.batch_size)
      results.append(r)
      print(f"| {mixture} | {workers} | {r['examples_per_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['batches_per_s']:.2f} | "
            f"{r['packing_efficiency']:.3f} | {r['warmup_s']:.1f} |", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
