"""A/B train-step throughput of two checkouts in one run (alternating, same machine).

    git worktree add ../baseline <commit>
    python bench/ab.py ../baseline . --case reference --rounds 3

Runs `bench/train_step.py --case CASE --devices D` from each checkout in
turn, `rounds` times, and prints each run and the best tokens/s of each side
with their ratio. Alternating spreads the shared machine's noise over both.
"""

import argparse
import json
import os
import subprocess
import sys


def one(root: str, case: str, devices: int, steps: int) -> dict:
  out = subprocess.run([sys.executable, os.path.join(root, 'bench', 'train_step.py'), '--case',
                        case, '--devices', str(devices), '--steps', str(steps)],
                       capture_output=True, text=True, cwd=root,
                       env=dict(os.environ, PYTHONPATH=os.path.abspath(root)))
  lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
  if out.returncode or not lines:
    raise SystemExit(f'{root}: train_step.py failed:\n{out.stderr[-3000:]}')
  return json.loads(lines[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('a')
  ap.add_argument('b')
  ap.add_argument('--case', default='reference')
  ap.add_argument('--devices', type=int, default=1)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--rounds', type=int, default=3)
  args = ap.parse_args()
  best = {args.a: 0.0, args.b: 0.0}
  for r in range(args.rounds):
    for root in (args.a, args.b):
      row = one(root, args.case, args.devices, args.steps)
      best[root] = max(best[root], row['tokens_per_s'])
      print(f"round {r} {root}: {row['tokens_per_s']:.0f} tokens/s, {row['step_ms']:.0f} ms/step, "
            f"loss {row['loss']:.6f}", flush=True)
  print(f"best: {args.a} {best[args.a]:.0f}, {args.b} {best[args.b]:.0f} tokens/s; "
        f"ratio b/a {best[args.b] / best[args.a]:.3f}")


if __name__ == '__main__':
  main()
