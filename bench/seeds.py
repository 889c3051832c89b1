"""Task accuracy over several seeds: the main job's margins, mean and minimum.

    python bench/seeds.py configs/nano.yaml --seeds 0 1 2
    python bench/seeds.py configs/nano.yaml --seeds 0 1 2 --table-only

For each seed: `python train.py CONFIG train.seed=S train.run_dir=runs/seeds/<name>-S`
then `python eval.py` with the same overrides, one after the other (the
machine's cores go to one run at a time; wall times are of that run alone
only if nothing else ran). Reads each run's eval/eval.json and prints a
markdown table: per task the generated exact match (greedy decoding with the
KV cache; teacher-forced where a task is not generated) of every seed, their
mean and minimum, and the wall time of train + eval per seed. Runs that
already have an eval.json are not repeated (delete the run directory to
redo one); `--table-only` never trains.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ('image_digit', 'speech_digit', 'speech_digit_human', 'same_digit', 'video_digits')


def run_dir(config: str, seed: int) -> str:
  name = os.path.splitext(os.path.basename(config))[0]
  return os.path.join('runs', 'seeds', f'{name}-{seed}')


def run_seed(config: str, seed: int, extra: list[str]) -> float | None:
  """Trains and evaluates one seed; wall seconds, or None if it was done before."""
  out = run_dir(config, seed)
  if os.path.exists(os.path.join(ROOT, out, 'eval', 'eval.json')):
    return None
  overrides = [f'train.seed={seed}', f'train.run_dir={out}', *extra]
  t0 = time.time()
  for script in ('train.py', 'eval.py'):
    subprocess.run([sys.executable, script, config, *overrides], cwd=ROOT, check=True)
  return time.time() - t0


def score(task: dict) -> float:
  return task.get('generated_exact_match', task['exact_match'])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('config')
  ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  ap.add_argument('--table-only', action='store_true')
  ap.add_argument('overrides', nargs='*', help='section.key=value for every seed')
  args = ap.parse_args(argv)
  walls = {}
  for s in args.seeds:
    if not args.table_only:
      walls[s] = run_seed(args.config, s, args.overrides)
  results = {}
  for s in args.seeds:
    path = os.path.join(ROOT, run_dir(args.config, s), 'eval', 'eval.json')
    if not os.path.exists(path):
      print(f'seed {s}: no {path}', file=sys.stderr)
      continue
    with open(path) as f:
      results[s] = json.load(f)['tasks']
  if not results:
    return 1
  seeds = sorted(results)
  print('| task | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean | min |')
  print('|---|' + '---|' * (len(seeds) + 2))
  for task in TASKS:
    vals = [100 * score(results[s][task]) for s in seeds if task in results[s]]
    if len(vals) != len(seeds):
      continue
    cells = ' | '.join(f'{v:.1f}%' for v in vals)
    print(f'| {task} | {cells} | {sum(vals) / len(vals):.1f}% | {min(vals):.1f}% |')
  draw = [100 * results[s]['draw_digit']['drawing']['drawn_as_requested']
          for s in seeds if 'drawing' in results[s].get('draw_digit', {})]
  if len(draw) == len(seeds):
    print(f'| draw_digit (drawn as requested) | ' + ' | '.join(f'{v:.1f}%' for v in draw)
          + f' | {sum(draw) / len(draw):.1f}% | {min(draw):.1f}% |')
  timed = {s: w for s, w in walls.items() if w is not None}
  if timed:
    print('\nwall (train + eval): ' + ', '.join(f'seed {s} {w / 60:.1f} min'
                                                for s, w in timed.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
