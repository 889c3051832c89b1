"""MoE step time against a dense model with the same active parameters.

    python bench/moe.py                 # the table: one process for 1 device, one for 8
    python bench/moe.py --devices 8     # one device count, JSON lines

Models: `configs/nano-moe.yaml` (8 experts of width 256, top-2, every layer)
and `configs/nano.yaml` (dense SwiGLU 512 = the same active FFN width, so the
same FLOPs per token up to the router). Paths: `capacity` (what the default
`auto` picks on CPU) and `dropless`. 8 devices are emulated CPU devices in a
separate process, on two meshes: `data` (the batch split only, every device
holds all experts) and `expert` (expert parallel: tokens move with
all_to_all).

Every run on one device count lives in one process and is timed round-robin
(`--rounds` rounds of `--steps` steps each), so the runs share whatever load
the machine has; the table reports the fastest round (the least disturbed
estimate) and the median.

Columns: step time, the ratio to the dense step on the same devices, the
dropped-assignment fraction, and the dispatch/combine share of the MoE step:
per MoE layer, forward+backward of the whole layer minus the router alone and
minus the experts alone (on pre-built buffers of the same shape), times the
number of MoE layers, over the step time. Measured on 1 device only (under a
mesh the collectives are part of the dispatch and cannot be isolated this way).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    'dense': ('configs/nano.yaml', []),
    'capacity': ('configs/nano-moe.yaml', ['model.moe.path=capacity']),
    'dropless': ('configs/nano-moe.yaml', ['model.moe.path=dropless']),
}


def _time(fn, steps: int) -> float:
  """Seconds per call, over `steps` calls (the caller takes the min of rounds)."""
  import jax
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def layer_breakdown(cfg, tokens_BxTxD_shape) -> dict:
  """Warmed thunks: fwd+bwd of one MoE layer, of its router, of its experts alone."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from gemjax.model import moe
  from gemjax.model.spec import decoder_spec
  from gemjax.parallel import expert as expert_lib

  spec = next(b.mlp for b in decoder_spec(cfg).period if b.is_moe)
  layer = nnx.jit(lambda: spec.build(nnx.Rngs(0)))()
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(0), tokens_BxTxD_shape, jnp.float32)
  B, T, D = x.shape
  m = cfg.moe
  E, K = m.num_experts, m.top_k
  path = expert_lib.resolve_path(m.path)

  def layer_loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y) + aux['moe_lb_loss'] + aux['moe_z_loss']

  def router_loss(w, x):
    logits = jnp.einsum('btd,de->bte', x, w, precision=jax.lax.Precision.HIGHEST)
    e, g, p = moe.top_k_routing(logits, K, renormalize=m.renormalize)
    return jnp.sum(g) + moe.load_balance_loss(p, e, jnp.ones((B, T), bool))

  weights = (layer.w_gate_ExDxF[...], layer.w_up_ExDxF[...], layer.w_down_ExFxD[...])
  if path == 'capacity':
    C = expert_lib.expert_capacity(T, E, K, m.capacity_factor)
    buf = jax.random.normal(jax.random.key(1), (E, B * C, D), jnp.float32)
    experts_loss = lambda w, h: jnp.sum(moe.SWIGLU_EXPERTS.batched(w, h))
  else:
    buf = jax.random.normal(jax.random.key(1), (B * T * K, D), jnp.float32)
    sizes = jnp.full((E,), B * T * K // E, jnp.int32)
    experts_loss = lambda w, h: jnp.sum(moe.SWIGLU_EXPERTS.grouped(w, h, sizes))

  f_layer = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))
  f_router = jax.jit(jax.grad(router_loss, argnums=(0, 1)))
  f_experts = jax.jit(jax.grad(experts_loss, argnums=(0, 1)))
  fns = dict(layer=lambda: f_layer(state, x),
             router=lambda: f_router(layer.router_DxE[...], x),
             experts=lambda: f_experts(weights, buf))
  for fn in fns.values():
    jax.block_until_ready(fn())
  return fns


def build_case(case: str, devices: int, mesh_kind: str):
  """(config, one-step thunk) for a case, compiled and warmed up."""
  import jax
  from gemjax.config import load_config
  from gemjax.data.registry import make_iterator
  from gemjax.parallel import sharding as shd
  from gemjax.train import state as S

  path, overrides = CASES[case]
  if mesh_kind == 'expert':
    mesh_over = ['mesh.data=1', f'mesh.expert={devices}']
  else:
    mesh_over = [f'mesh.data={devices}']
  cfg = load_config(os.path.join(ROOT, path), overrides + mesh_over)
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
  holder = {'state': state, 'i': 0}

  def one():
    with shd.use_mesh(mesh):
      holder['state'], m = step(holder['state'], gb[holder['i'] % len(gb)])
    holder['i'] += 1
    return m

  t0 = time.perf_counter()
  jax.block_until_ready(one())
  return cfg, mdef, one, time.perf_counter() - t0


def run_devices(devices: int, steps: int, rounds: int) -> list[dict]:
  """All runs on `devices`, timed round-robin so they share the machine's load."""
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  import jax
  sys.path.insert(0, ROOT)
  from gemjax.model import flops as flops_lib
  from gemjax.train import state as S

  from gemjax.parallel.expert import resolve_path
  default = resolve_path('auto')
  runs = [('dense', 'data'), ('capacity', 'data'), ('dropless', 'data')]
  if devices > 1:
    runs += [('capacity', 'expert'), ('dropless', 'expert')]
  built = {r: build_case(*r[:1], devices, r[1]) for r in runs}
  breakdown = {}
  if devices == 1:
    for case in ('capacity', 'dropless'):
      cfg = built[(case, 'data')][0]
      shape = (cfg.train.batch_size, cfg.train.seq_len, cfg.model.d_model)
      breakdown[case] = layer_breakdown(cfg.model, shape)
  times = {r: [] for r in runs}
  parts = {c: {k: [] for k in ('layer', 'router', 'experts')} for c in breakdown}
  for _ in range(rounds):
    for r, (_, _, one, _) in built.items():
      times[r].append(_time(one, steps))
    for c, fns in breakdown.items():
      for k, fn in fns.items():  # one layer is ~1/10 of a step: time more calls
        parts[c][k].append(_time(fn, 4 * steps))
  rows = []
  for r, (cfg, mdef, one, compile_s) in built.items():
    m = one()
    step_s = min(times[r])
    row = dict(case=r[0], devices=devices, mesh=r[1], step_ms=step_s * 1e3,
               step_ms_median=statistics.median(times[r]) * 1e3, compile_s=compile_s,
               path=cfg.model.moe.path if cfg.model.moe.num_experts else '-',
               active_params_per_token=flops_lib.matmul_params_per_token(mdef.spec),
               params=S.param_count(mdef), loss=float(m['loss']))
    if cfg.model.moe.num_experts:
      n_moe = flops_lib.num_moe_layers(mdef.spec)
      row['dropped'] = float(sum(v.mean() for k, v in m.items() if 'moe_dropped' in k) / n_moe)
      row['default'] = r[0] == default
      if r[0] in parts and r[1] == 'data':
        p = {k: min(v) for k, v in parts[r[0]].items()}
        dispatch = max(p['layer'] - p['router'] - p['experts'], 0.0)
        row.update({f'{k}_ms': v * 1e3 for k, v in p.items()})
        row['dispatch_frac'] = dispatch * n_moe / step_s
    rows.append(row)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--devices', type=int, help='run one device count (in this process)')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--rounds', type=int, default=6)
  args = ap.parse_args()
  if args.devices:
    for row in run_devices(args.devices, args.steps, args.rounds):
      print(json.dumps(row))
    return
  rows = []
  for devices in (1, 8):
    out = subprocess.run([sys.executable, __file__, '--devices', str(devices),
                          '--steps', str(args.steps), '--rounds', str(args.rounds)],
                         capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
    if out.returncode or not lines:
      print(out.stderr[-3000:], file=sys.stderr)
      continue
    for l in lines:
      print(l, file=sys.stderr)
      rows.append(json.loads(l))
  dense = {r['devices']: r['step_ms'] for r in rows if r['case'] == 'dense'}
  print('| model | path | devices | mesh | step ms (min) | step ms (median) | vs dense | '
        'dropped | dispatch+combine share of step | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    d = r['devices']
    model = 'nano (dense)' if r['case'] == 'dense' else 'nano-moe'
    path = r['path'] + (' (default)' if r.get('default') else '')
    drop = f"{r['dropped']:.1%}" if 'dropped' in r else '-'
    disp = f"{r['dispatch_frac']:.0%}" if 'dispatch_frac' in r else '-'
    print(f"| {model} | {path} | {d} | {r['mesh']} | {r['step_ms']:.1f} | "
          f"{r['step_ms_median']:.1f} | {r['step_ms'] / dense.get(d, float('nan')):.2f}x | "
          f"{drop} | {disp} | "
          f"{r['compile_s']:.1f} |")


if __name__ == '__main__':
  main()
