"""MoE step time against a dense model with the same active parameters.

    python bench/moe.py                      # the table: one process for 1 device, one for 8
    python bench/moe.py --devices 8          # one device count, JSON lines
    python bench/moe.py --baseline HEAD --cases dense,capacity --mesh data
                                             # A/B: the MoE code at a git revision, same run

Models: `configs/nano-moe.yaml` (8 experts of width 256, top-2, every layer)
against its dense twin `dense` = the same file with `model.moe.num_experts=0`
(dense SwiGLU 512 = the same active FFN width, so the same FLOPs per token up
to the router; same vocabulary, data, batch and sequence length). `nano` is
`configs/nano.yaml`, the baseline of earlier tables: it also has a larger
vocabulary (1280 vs 512) and another data mixture, so its step is not the
MoE's equal. Paths: `capacity` (what the default `auto` picks) and
`dropless`. 8 devices are emulated CPU devices in a separate process, on
the meshes `data` (the batch split only, every device holds all experts and
updates all parameters), `expert` (expert parallel: tokens move with
all_to_all) and, with `--mesh ...,fsdp`, `fsdp` (batch and parameters split
over fsdp; the dense twin runs there too).

`--baseline REV` adds `capacity@REV`: the same model and batches, but traced
with `gemjax/model/moe.py` and `gemjax/parallel/expert.py` as they are at git
revision REV (loaded from `git show`), so old and new code are timed in the
same process, interleaved, with the same parameters and data (same first
steps; after ~15 steps a rounding difference flips a routing decision and
the runs drift apart).

Every run on one device count lives in one process and is timed round-robin
(`--rounds` rounds of `--steps` steps each), so the runs share whatever load
the machine has; the table reports the fastest round (the least disturbed
estimate) and the median.

Columns: step time, the ratio to the dense twin's step on the same devices
(same mesh; on `expert`, the twin's `data` run), the final loss (old and new
code must agree until routing flips on rounding, ~15 steps in), the
dropped-assignment fraction, and the dispatch/combine share of the MoE step:
per MoE layer, forward+backward of the whole layer minus the router alone and
minus the experts alone (on pre-built buffers of the same shape), times the
number of MoE layers, over the step time. Measured on 1 device only (under a
mesh the collectives are part of the dispatch and cannot be isolated this
way).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    'dense': ('configs/nano-moe.yaml', ['model.moe.num_experts=0']),
    'nano': ('configs/nano.yaml', []),
    'capacity': ('configs/nano-moe.yaml', ['model.moe.path=capacity']),
    'dropless': ('configs/nano-moe.yaml', ['model.moe.path=dropless']),
}
DEFAULT_CASES = 'dense,nano,capacity,dropless'


def load_revision(rev: str):
  """gemjax.model.moe as it is at git revision `rev`, wired to the
  gemjax.parallel.expert of that revision (module objects, not imported)."""
  import types
  mods = {}
  for name, path in (('expert', 'gemjax/parallel/expert.py'), ('moe', 'gemjax/model/moe.py')):
    src = subprocess.run(['git', 'show', f'{rev}:{path}'], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    mod = types.ModuleType(f'_gemjax_at_{rev}_{name}')
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f'{rev}:{path}', 'exec'), mod.__dict__)
    mods[name] = mod
  old_moe, old_expert = mods['moe'], mods['expert']
  old_moe.expert_lib = old_expert
  old_moe.SWIGLU_EXPERTS = old_expert.ExpertFns(batched=old_moe._swiglu_batched,
                                                grouped=old_moe._swiglu_grouped)
  return old_moe


@contextlib.contextmanager
def traced_with(old_moe):
  """While tracing, MoE layers run `old_moe`'s forward (same parameters)."""
  from gemjax.model import moe
  if old_moe is None:
    yield
    return
  names = ('__call__', '_aux')
  saved = {k: moe.MoE.__dict__[k] for k in names}
  try:
    for k in names:
      setattr(moe.MoE, k, old_moe.MoE.__dict__[k])
    yield
  finally:
    for k, v in saved.items():
      setattr(moe.MoE, k, v)


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


def build_case(case: str, devices: int, mesh_kind: str, old_moe=None):
  """(config, one-step thunk) for a case, compiled and warmed up; `old_moe`
  (from `load_revision`) swaps in another revision's MoE while tracing."""
  import jax
  from gemjax.config import load_config
  from gemjax.data.registry import make_iterator
  from gemjax.parallel import mesh as mesh_lib
  from gemjax.parallel import sharding as shd
  from gemjax.train import state as S

  path, overrides = CASES[case.split('@')[0]]
  if mesh_kind == 'expert':
    mesh_over = ['mesh.data=1', f'mesh.expert={devices}']
  elif mesh_kind == 'fsdp':
    mesh_over = ['mesh.data=1', f'mesh.fsdp={devices}']
  else:
    mesh_over = [f'mesh.data={devices}']
  cfg = load_config(os.path.join(ROOT, path), overrides + mesh_over)
  sizes = mesh_lib.validate_mesh(cfg, devices)  # fills nano-moe's `expert: -1`
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
  with traced_with(old_moe):  # the step is traced (and compiled) here, once
    jax.block_until_ready(one())
  return cfg, mdef, one, time.perf_counter() - t0


def run_devices(devices: int, steps: int, rounds: int, cases: list[str],
                meshes: list[str], baseline: str | None = None) -> list[dict]:
  """All runs on `devices`, timed round-robin so they share the machine's load."""
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  import jax
  sys.path.insert(0, ROOT)
  from gemjax.model import flops as flops_lib
  from gemjax.train import state as S

  from gemjax.parallel.expert import resolve_path
  default = resolve_path('auto')
  old_moe = load_revision(baseline) if baseline else None
  if baseline:
    cases = cases + [f'capacity@{baseline}']
  runs = []
  for mesh in (meshes if devices > 1 else ['data']):
    for case in cases:
      # dense models have nothing to split over `expert`: their twin on that
      # mesh is the data-parallel run of the same device count.
      if mesh == 'expert' and case in ('dense', 'nano'):
        continue
      runs.append((case, mesh))
  built = {r: build_case(r[0], devices, r[1], old_moe if '@' in r[0] else None) for r in runs}
  breakdown = {}
  if devices == 1:
    for case in ('capacity', 'dropless'):
      if (case, 'data') in built:
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
    twin = ('dense', r[1]) if ('dense', r[1]) in times else ('dense', 'data')
    if twin in times:
      row['vs_dense'] = step_s / min(times[twin])
      # the ratio of each round's times (same round = same load), median
      row['vs_dense_median_of_rounds'] = statistics.median(
          a / b for a, b in zip(times[r], times[twin]))
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
  ap.add_argument('--cases', default=DEFAULT_CASES, help=f'comma-separated, of {list(CASES)}')
  ap.add_argument('--mesh', default='data,expert', help='8-device meshes: data, expert, fsdp')
  ap.add_argument('--baseline', help='git revision: also time its MoE code (capacity@REV)')
  ap.add_argument('--device-counts', default='1,8')
  args = ap.parse_args()
  cases, meshes = args.cases.split(','), args.mesh.split(',')
  if args.devices:
    for row in run_devices(args.devices, args.steps, args.rounds, cases, meshes, args.baseline):
      print(json.dumps(row))
    return
  rows = []
  for devices in map(int, args.device_counts.split(',')):
    cmd = [sys.executable, __file__, '--devices', str(devices), '--steps', str(args.steps),
           '--rounds', str(args.rounds), '--cases', args.cases, '--mesh', args.mesh]
    if args.baseline:
      cmd += ['--baseline', args.baseline]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
    if out.returncode or not lines:
      print(out.stderr[-3000:], file=sys.stderr)
      continue
    for l in lines:
      print(l, file=sys.stderr)
      rows.append(json.loads(l))
  print('| model | path | devices | mesh | step ms (min) | step ms (median) | vs dense twin '
        '(min / median of rounds) | loss | dropped | dispatch+combine share of step | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    d = r['devices']
    model = {'dense': 'dense twin', 'nano': 'nano (dense)'}.get(r['case'], 'nano-moe')
    rev = r['case'].partition('@')[2]
    path = r['path'] + (' (default)' if r.get('default') else '') + (f' @ {rev}' if rev else '')
    drop = f"{r['dropped']:.1%}" if 'dropped' in r else '-'
    disp = f"{r['dispatch_frac']:.0%}" if 'dispatch_frac' in r else '-'
    vs = (f"{r['vs_dense']:.2f}x / {r['vs_dense_median_of_rounds']:.2f}x"
          if 'vs_dense' in r else '-')
    print(f"| {model} | {path} | {d} | {r['mesh']} | {r['step_ms']:.1f} | "
          f"{r['step_ms_median']:.1f} | {vs} | {r['loss']:.5f} | {drop} | {disp} | "
          f"{r['compile_s']:.1f} |")


if __name__ == '__main__':
  main()
