"""Long-context attention benchmark: memory and time of dense, blockwise, ring.

    python bench/long_context.py                      # the full table (CPU: ~20 min)
    python bench/long_context.py --seqs 4096,16384 --kernels blockwise,ring
    python bench/long_context.py --nano-step 32768    # nano model, one ring train step

Setting: B=1, 8 heads (MHA), head dim 64, float32, causal, one document.
Each (kernel, S) runs in its own subprocess, so peak memory is that
process's peak RSS (`ru_maxrss`), and each subprocess is capped with
RLIMIT_AS (`--mem-gib`, default 10) so an out-of-memory configuration fails
inside its own process instead of taking the shared machine down; a
parent-side RSS watchdog backs that up. A kernel stops growing S after an
OOM or when the measured time (or the time projected from the previous S,
x (S'/S)^2) passes `--time-cap` seconds.

  dense      one device, the full [T, S] score matrix
  blockwise  one device, chunks of 512, custom-VJP (gemjax.kernels.flash)
  ring       8 emulated CPU devices on the 'context' axis, zigzag layout

Emulated devices share this host's cores, so ring wall time is the *sum* of
the devices' work, not the max: the load-balance table (largest number of
unmasked 512x512 KV blocks any device computes, from `layouts.block_work`)
is what shows the layouts' effect. Times are fwd+bwd after compilation.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

H, K, BLOCK, RING_DEVICES = 8, 64, 512, 8


def _rss_gib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 2 ** 20
  return float('nan')


def _peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# ------------------------------------------------------------------ workers


def worker_attention(kernel: str, S: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from gemjax.model.attention import KERNELS as ATTENTION_KERNELS
  from gemjax.model.info import SequenceInfo
  from gemjax.parallel import layouts, sharding as shd

  n = RING_DEVICES if kernel == 'ring' else 1
  perm = layouts.layout_permutation(S, n, 'zigzag')
  idx = jnp.asarray(perm[None])
  ones = jnp.ones((1, S), jnp.int32)
  info = SequenceInfo(jnp.zeros((1, S, 3), jnp.int32), ones, 0 * ones, idx, jnp.zeros((1, S), jnp.int8))
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(kk, (1, S, H, K), jnp.float32) for kk in keys)
  fn = ATTENTION_KERNELS['dense'] if kernel == 'dense' else \
      (lambda *a, **kw: ATTENTION_KERNELS[kernel](*a, block=BLOCK, **kw))

  def loss(q, k, v, ct, info):
    return jnp.sum(fn(q, k, v, info, causal=True, window=0) * ct)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  if kernel == 'ring':
    mesh = shd.make_mesh({'data': 1, 'fsdp': 1, 'expert': 1, 'context': n, 'tensor': 1})
    seq = NamedSharding(mesh, P(None, 'context'))
    q, k, v, ct = (jax.device_put(x, seq) for x in (q, k, v, ct))
    info = jax.tree.map(lambda x: jax.device_put(x, seq), info)
    ctx = shd.use_mesh(mesh)
  else:
    import contextlib
    ctx = contextlib.nullcontext()
  base = _rss_gib()
  with ctx:
    t0 = time.time()
    compiled = step.lower(q, k, v, ct, info).compile()
    compile_s = time.time() - t0
    times = []
    for _ in range(repeats):
      t0 = time.time()
      jax.block_until_ready(compiled(q, k, v, ct, info))
      times.append(time.time() - t0)
  return {'compile_s': compile_s, 'time_s': min(times), 'base_gib': base,
          'peak_gib': _peak_gib()}


def worker_nano_step(S: int) -> dict:
  """The nano model (gemjax defaults) trains one step at S tokens with 'ring'."""
  import jax
  import numpy as np
  from gemjax.config import ModelConfig, OptimizerConfig
  from gemjax.batch import text_batch
  from gemjax.parallel import layouts, sharding as shd
  from gemjax.train import state as st

  cfg = ModelConfig(attention='ring')
  mesh = shd.make_mesh({'data': 1, 'fsdp': 1, 'expert': 1, 'context': RING_DEVICES, 'tensor': 1})
  mdef = st.model_def(cfg)
  tx = st.make_optimizer(OptimizerConfig(warmup_steps=0), 10)
  state = st.init_state(cfg, mdef, tx, mesh, 0)
  tokens = np.random.default_rng(0).integers(0, 256, (1, S))
  batch = layouts.apply_layout(text_batch(tokens), 'zigzag', RING_DEVICES)
  shards = st.batch_shardings(mesh, {k: v.ndim for k, v in batch.items()})
  gb = st.to_global(batch, shards)
  step = st.make_train_step(mdef, tx, cfg, st.lr_schedule(OptimizerConfig(), 10))
  base = _rss_gib()
  with shd.use_mesh(mesh):
    t0 = time.time()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, gb).compile()
    compile_s = time.time() - t0
    t0 = time.time()
    state, m = compiled(state, gb)
    loss = float(m['loss'])
    step_s = time.time() - t0
    state, m = compiled(state, gb)
    loss2 = float(m['loss'])
  return {'tokens': S, 'loss_step1': loss, 'loss_step2': loss2, 'finite': bool(m['finite']),
          'compile_s': compile_s, 'step_s': step_s, 'base_gib': base, 'peak_gib': _peak_gib()}


# ------------------------------------------------------------------- parent


def run_worker(args: list[str], devices: int, mem_gib: float, time_cap: float) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  limit = int(mem_gib * 2 ** 30)

  def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

  proc = subprocess.Popen([sys.executable, __file__, '--worker', *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=cap)
  killed = {}

  def watchdog():  # RSS backstop (RLIMIT_AS counts virtual memory only)
    import psutil
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
      try:
        if p.memory_info().rss > limit:
          killed['why'] = 'oom (rss watchdog)'
          proc.kill()
      except psutil.Error:
        return
      time.sleep(0.05)

  threading.Thread(target=watchdog, daemon=True).start()
  try:
    out, err = proc.communicate(timeout=time_cap)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    return {'status': f'time cap ({time_cap:.0f} s)'}
  if killed:
    return {'status': killed['why']}
  if proc.returncode != 0:
    oom = 'RESOURCE_EXHAUSTED' in err or 'MemoryError' in err or 'bad_alloc' in err
    return {'status': 'oom' if oom else f'error: {err.strip().splitlines()[-1][:120]}'}
  return {'status': 'ok', **json.loads(out.strip().splitlines()[-1])}


def load_balance_table(seqs, n=RING_DEVICES, block=BLOCK) -> str:
  from gemjax.parallel import layouts
  lines = ['| S | layout | ring steps / device (min-max) | max KV blocks / device | '
           'mean KV blocks | blocks max/mean | visible pairs max/mean |',
           '|---|---|---|---|---|---|---|']
  for S in seqs:
    for name in layouts.LAYOUTS:
      w = layouts.block_work(S, n, name, block)
      b, pairs = w['blocks'], w['pairs']
      lines.append(f'| {S // 1024}K | {name} | {w["steps"].min()}-{w["steps"].max()} | '
                   f'{b.max()} | {b.mean():.1f} | {b.max() / b.mean():.2f} | '
                   f'{pairs.max() / pairs.mean():.2f} |')
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--worker', action='store_true')
  ap.add_argument('--kernel', default='')
  ap.add_argument('--seq', type=int, default=0)
  ap.add_argument('--repeats', type=int, default=1)
  ap.add_argument('--seqs', default='4096,16384,32768,65536')
  ap.add_argument('--kernels', default='dense,blockwise,ring')
  ap.add_argument('--mem-gib', type=float, default=10.0)
  ap.add_argument('--time-cap', type=float, default=300.0)
  ap.add_argument('--nano-step', type=int, default=0)
  ap.add_argument('--skip-balance', action='store_true')
  args = ap.parse_args()

  if args.worker:
    res = worker_nano_step(args.seq) if args.kernel == 'nano' else \
        worker_attention(args.kernel, args.seq, args.repeats)
    print(json.dumps(res))
    return

  if args.nano_step:
    res = run_worker(['--kernel', 'nano', '--seq', str(args.nano_step)], RING_DEVICES,
                     args.mem_gib, max(args.time_cap, 600))
    print(json.dumps(res, indent=1))
    return

  seqs = [int(s) for s in args.seqs.split(',')]
  rows = ['| kernel | devices | S | status | fwd+bwd s | compile s | peak RSS GiB | '
          'above baseline GiB |', '|---|---|---|---|---|---|---|---|']
  for kernel in args.kernels.split(','):
    devices = RING_DEVICES if kernel == 'ring' else 1
    stop, prev = None, None
    for S in seqs:
      if stop:
        rows.append(f'| {kernel} | {devices} | {S // 1024}K | {stop} | | | | |')
        continue
      projected = prev and prev[1] * (S / prev[0]) ** 2 + prev[2]
      if projected and projected > args.time_cap:
        stop = f'skipped: projected {projected:.0f} s > time cap'
        rows.append(f'| {kernel} | {devices} | {S // 1024}K | {stop} | | | | |')
        continue
      repeats = 3 if S <= 4096 else 1
      r = run_worker(['--kernel', kernel, '--seq', str(S), '--repeats', str(repeats)],
                     devices, args.mem_gib, args.time_cap)
      print(kernel, S, r, flush=True)
      if r['status'] != 'ok':
        stop = r['status'] if 'cap' in r['status'] else None
        rows.append(f'| {kernel} | {devices} | {S // 1024}K | {r["status"]} | | | | |')
        if r['status'].startswith('oom') or 'cap' in r['status']:
          stop = f'skipped after {r["status"]}'
        continue
      prev = (S, r['time_s'], r['compile_s'])
      rows.append(f'| {kernel} | {devices} | {S // 1024}K | ok | {r["time_s"]:.2f} | '
                  f'{r["compile_s"]:.1f} | {r["peak_gib"]:.2f} | '
                  f'{r["peak_gib"] - r["base_gib"]:.2f} |')
  print('\n' + '\n'.join(rows))
  if not args.skip_balance:
    print('\nLoad balance, causal, 8 context shards, 512 x 512 KV blocks:\n')
    print(load_balance_table(seqs))


if __name__ == '__main__':
  main()
