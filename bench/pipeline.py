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
  nano        configs/nano.yaml's mixture, tokenizer settings, T and B; its
              batches/s is compared with the steps/s of a nano training run
              (runs/nano/metrics.jsonl, if present): the pipeline must stay
              ahead of the model.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from gemjax.config import DatasetConfig  # noqa: E402
from gemjax.data import pipeline  # noqa: E402
from gemjax.data.sequence import SequenceBuilder  # noqa: E402
from gemjax.tokenizers.text import ByteTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(os.path.dirname(__file__), '..', 'data', 'sample', 'train')
MIXTURES = {
    'multimodal': {'image_digit': 1, 'speech_digit': 1, 'same_digit': 1,
                   'video_digits': 1, 'photo_caption': 1, 'text_lm': 1},
    'text_heavy': {'text_lm': 0.8, 'image_digit': 0.1, 'speech_digit': 0.1},
    'nano': None,   # configs/nano.yaml's own mixture (see --nano-config)
}
BUDGETS = {'image': 96, 'audio': 160, 'video': 96}


def nano_setup(config: str):
  """The preset's own mixture, tokenizer settings, seq_len and batch size."""
  from gemjax.config import load_config
  from gemjax.data import registry
  cfg = load_config(config)
  return (registry.data_settings(cfg, 'train'), registry.sequence_builder(cfg),
          cfg.train.seq_len, cfg.train.batch_size)


def train_steps_per_s(metrics_path: str) -> float | None:
  """Median training steps/s logged by a run (`metrics.jsonl`), if there is one."""
  if not os.path.exists(metrics_path):
    return None
  times = []
  with open(metrics_path) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get('split') == 'train' and rec.get('step_time_s'):
        times.append(rec['step_time_s'])
  times = sorted(times[1:])   # the first window includes compilation
  return 1.0 / times[len(times) // 2] if times else None


def run(mixture: str, workers: int, seconds: float, seq_len: int, batch_size: int,
        warmup: int = 3, nano_config: str = '') -> dict:
  if mixture == 'nano':
    settings, builder, seq_len, batch_size = nano_setup(nano_config)
    settings = dataclasses.replace(settings, num_workers=workers, worker_buffer=2,
                                   read_threads=1)
  else:
    builder = SequenceBuilder(ByteTokenizer())
    settings = pipeline.DataSettings(
        datasets=tuple(DatasetConfig(os.path.join(SAMPLE, f'{task}-*'), weight=w)
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
  parser.add_argument('--nano-config', default=os.path.join(ROOT, 'configs', 'nano.yaml'),
                      help="the preset of the 'nano' mixture row")
  parser.add_argument('--train-metrics', default=os.path.join(ROOT, 'runs', 'nano', 'metrics.jsonl'),
                      help="a nano run's metrics.jsonl: its steps/s is what the pipeline must beat")
  args = parser.parse_args(argv)
  results = []
  steps_per_s = train_steps_per_s(args.train_metrics)
  print(f'T={args.seq_len} B={args.batch_size} budgets={BUDGETS} cpus={os.cpu_count()} '
        f"(the 'nano' rows use {os.path.relpath(args.nano_config, ROOT)}'s own data settings, "
        f'T and B)')
  if steps_per_s:
    print(f'nano training consumes {steps_per_s:.2f} batches/s (median of {args.train_metrics})')
  print('| mixture | workers | examples/s | tokens/s | batches/s | packing efficiency | '
        'warm-up s | batches/s over nano training steps/s |')
  print('|---|---|---|---|---|---|---|---|')
  for mixture in args.mixtures:
    for workers in args.workers:
      r = run(mixture, workers, args.seconds, args.seq_len, args.batch_size,
              nano_config=args.nano_config)
      results.append(r)
      ratio = (f"{r['batches_per_s'] / steps_per_s:.1f}x"
               if mixture == 'nano' and steps_per_s else '-')
      print(f"| {mixture} | {workers} | {r['examples_per_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['batches_per_s']:.2f} | "
            f"{r['packing_efficiency']:.3f} | {r['warmup_s']:.1f} | {ratio} |", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
