"""Train-step throughput and MFU on this machine.

    python bench/train_step.py            # all cases, one subprocess per device count
    python bench/train_step.py --case reference --devices 1 --steps 10

Cases: `nano` (configs/nano.yaml as it is today) and `reference`, a fixed shape
that stays put as the presets evolve: d_model 256, 4 layers, 4 heads of 64 (no
GQA), SwiGLU 1024, vocab 8192, untied embeddings, sequence 512, global batch 8,
float32, text only, 'blockwise' attention with 128-token chunks (the CPU
setting); `reference-dense` is the same shape with the 'dense' kernel. MFU counts 6 x matmul params x tokens + attention
(over the full T x T square, and again with the causal half: both columns)
(gemjax/model/flops.py) against the f32 matmul peak measured in the same
process just before the steps run.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    'nano': ('configs/nano.yaml', []),
    'reference': (None, ['model.attention=blockwise', 'model.attention_block=128',
                         'model.d_model=256', 'model.num_layers=4', 'model.num_heads=4',
                         'model.num_kv_heads=4', 'model.head_dim=64', 'model.mlp_dim=1024',
                         'model.vocab_size=8192', 'model.tie_embeddings=false',
                         'train.seq_len=512', 'train.batch_size=8',
                         'model.param_dtype=float32', 'model.compute_dtype=float32']),
}
# The same shape with the 'dense' kernel (full [T, S] scores), for comparison.
CASES['reference-dense'] = (None, CASES['reference'][1] + ['model.attention=dense'])


def run_case(case: str, devices: int, steps: int, extra: list[str]) -> dict:
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  import jax
  import numpy as np
  sys.path.insert(0, ROOT)
  from gemjax.config import load_config
  from gemjax.data.registry import make_iterator
  from gemjax.model import flops as flops_lib
  from gemjax.parallel import sharding as shd
  from gemjax.train import metrics as metrics_lib
  from gemjax.train import state as S

  path, overrides = CASES[case]
  mesh_over = ['mesh.data=1', f'mesh.fsdp={devices}']
  cfg = load_config(os.path.join(ROOT, path) if path else None, overrides + mesh_over + extra)
  sizes = {a: getattr(cfg.mesh, a) for a in shd.MESH_AXES}
  mesh = shd.make_mesh(sizes, devices=jax.devices())
  mdef = S.model_def(cfg.model)
  tx = S.make_optimizer(cfg.optimizer, 1000, mdef.groups)
  state = S.init_state(cfg.model, mdef, tx, mesh, 0)
  it = make_iterator(cfg, 'train')
  batches = [next(it) for _ in range(4)]
  bshards = S.batch_shardings(mesh, {k: v.ndim for k, v in batches[0].items()})
  step = S.jit_train_step(S.make_train_step(mdef, tx, cfg.model, S.lr_schedule(cfg.optimizer, 1000)),
                          S.state_shardings(mdef, tx, mesh), bshards)
  gb = [S.to_global(b, bshards) for b in batches]
  with shd.use_mesh(mesh):
    t0 = time.perf_counter()
    state, m = step(state, gb[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step(state, gb[1])
    jax.block_until_ready(m)
    peak = metrics_lib.measure_cpu_peak()
    t0 = time.perf_counter()
    for i in range(steps):
      state, m = step(state, gb[i % len(gb)])
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
  peak_after = metrics_lib.measure_cpu_peak()
  tokens = cfg.train.batch_size * cfg.train.seq_len
  fl = flops_lib.train_flops_per_step(mdef.spec, cfg.train.batch_size, cfg.train.seq_len)
  fl_half = flops_lib.train_flops_per_step(mdef.spec, cfg.train.batch_size, cfg.train.seq_len,
                                           causal_half=True)
  top = max(peak, peak_after)
  return dict(case=case, devices=devices, step_ms=dt * 1e3, tokens_per_s=tokens / dt,
              model_gflop_per_step=fl / 1e9, achieved_gflops=fl / dt / 1e9,
              peak_gflops=top / 1e9, mfu=fl / dt / top, mfu_causal=fl_half / dt / top,
              compile_s=compile_s, loss=float(np.asarray(m['loss'])))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--case', choices=list(CASES))
  ap.add_argument('--devices', type=int)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--json', action='store_true')
  ap.add_argument('overrides', nargs='*')
  args = ap.parse_args()
  if args.case and args.devices:
    r = run_case(args.case, args.devices, args.steps, args.overrides)
    print(json.dumps(r))
    return
  rows = []
  for case in ([args.case] if args.case else list(CASES)):
    for devices in ([args.devices] if args.devices else [1, 8]):
      out = subprocess.run([sys.executable, __file__, '--case', case, '--devices', str(devices),
                            '--steps', str(args.steps), *args.overrides],
                           capture_output=True, text=True, cwd=ROOT)
      lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
      if out.returncode or not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        continue
      rows.append(json.loads(lines[-1]))
  # MFU (full): attention counted over the whole T x T square; MFU (causal
  # half): half of it, as MaxText and most papers count (gemjax/model/flops.py).
  print('| case | devices | step ms | tokens/s | model GFLOP/step (full) | achieved GFLOP/s | '
        'measured peak GFLOP/s | MFU (full) | MFU (causal half) | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['case']} | {r['devices']} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | "
          f"{r['model_gflop_per_step']:.1f} | {r['achieved_gflops']:.1f} | {r['peak_gflops']:.1f} | "
          f"{r['mfu']:.1%} | {r['mfu_causal']:.1%} | {r['compile_s']:.1f} |")


if __name__ == '__main__':
  main()
