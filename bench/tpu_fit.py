"""Do the TPU presets fit their slices? Real compiles for the TPU topology.

    python bench/tpu_fit.py                       # flash, pro, ultra (hours on 2 cores)
    python bench/tpu_fit.py --presets flash --layers full
    python bench/tpu_fit.py --presets pro --layers 2 4

Each (preset, depth) is compiled by `python -m gemjax.train.aot PRESET
--topology T model.num_layers=L` in its own process (libtpu on this CPU host,
no TPU; JAX_PLATFORMS=cpu). With several reduced depths the per-chip peak is
extrapolated linearly to the preset's depth: scanned layers make every
layer's saved activations, parameters and optimizer state the same size, so
memory is affine in the number of layers (checked where a full-depth compile
exists). Extrapolated rows say so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gemjax import config as config_lib  # noqa: E402
from gemjax.train.tpu_compile import HBM_BYTES  # noqa: E402

TOPOLOGY = {'flash': 'v5p:4x4x4', 'pro': 'v5p:8x8x4', 'ultra': 'v5p:8x16x8'}
LIBTPU_DIR = os.path.join(ROOT, '.venv', 'libtpu')
HBM_GIB = HBM_BYTES['TPU v5'] / 2**30   # every preset targets v5p
_GIB = re.compile(r'(arguments|outputs|temporaries|code|peak) ([0-9.]+) GiB')


def compile_once(preset: str, layers: int | None, extra: list[str]) -> dict:
  args = [sys.executable, '-m', 'gemjax.train.aot', f'configs/{preset}.yaml',
          '--topology', TOPOLOGY[preset], *extra]
  if layers is not None:
    args.append(f'model.num_layers={layers}')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if os.path.isdir(os.path.join(LIBTPU_DIR, 'libtpu')):
    env['PYTHONPATH'] = LIBTPU_DIR
  out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
  line = next((l for l in out.stdout.splitlines() if ' on v5p' in l), '')
  if not line:
    raise RuntimeError(f'{preset} L={layers}: {out.stderr[-2000:]}')
  got = {k: float(v) for k, v in _GIB.findall(line)}
  got['compile_s'] = float(re.search(r'compiled in ([0-9.]+) s', line).group(1))
  got['line'] = line
  return got


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--presets', nargs='+', default=['flash', 'pro', 'ultra'])
  ap.add_argument('--layers', nargs='+', default=['2', '4'],
                  help="reduced depths to extrapolate from, or 'full'")
  ap.add_argument('overrides', nargs='*', help='key=value for every preset')
  args = ap.parse_args(argv)
  rows = []
  for preset in args.presets:
    cfg = config_lib.load_config(os.path.join(ROOT, 'configs', f'{preset}.yaml'), args.overrides)
    full = cfg.model.num_layers
    if args.layers == ['full']:
      r = compile_once(preset, None, args.overrides)
      rows.append(dict(preset=preset, layers=full, how='compiled', **r))
    else:
      depths = [int(x) for x in args.layers]
      got = [compile_once(preset, L, args.overrides) for L in depths]
      for L, r in zip(depths, got):
        rows.append(dict(preset=preset, layers=L, how='compiled', **r))
      (l0, r0), (l1, r1) = (depths[0], got[0]), (depths[-1], got[-1])
      slope = (r1['peak'] - r0['peak']) / (l1 - l0)
      rows.append(dict(preset=preset, layers=full, how=f'extrapolated from {l0}, {l1}',
                       peak=r0['peak'] + slope * (full - l0), compile_s=float('nan')))
  print('| preset | topology | layers | how | arguments GiB | temporaries GiB | peak GiB / chip | '
        'HBM GiB | fits | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['preset']} | {TOPOLOGY[r['preset']]} | {r['layers']} | {r['how']} | "
          f"{r.get('arguments', float('nan')):.2f} | {r.get('temporaries', float('nan')):.2f} | "
          f"{r['peak']:.2f} | {HBM_GIB:.2f} | {'yes' if r['peak'] <= HBM_GIB else 'NO'} | "
          f"{r['compile_s']:.0f} |", flush=True)
  print(json.dumps([{k: v for k, v in r.items() if k != 'line'} for r in rows]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
