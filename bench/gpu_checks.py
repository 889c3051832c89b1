"""The checks only a GPU machine can run, in one command.

    python bench/gpu_checks.py             # everything the visible GPUs allow
    python bench/gpu_checks.py --small     # tiny shapes: a dry run (also on CPU)

1. `cudnn`: cuDNN fused attention on packed and padded rows (the Grain
   pipeline's rows: several documents, then padding), causal, with and
   without a sliding window, GQA, bf16. `attention.cudnn_kernel` and
   `attention.blockwise_kernel` are both compared with an f32 dense
   reference (output and the gradients of q, k, v). Passes when cuDNN ran
   (the compiled program calls `__cudnn$fmha*`, and the kernel's output is
   closer to the direct fused call's than to the blockwise fallback's, so
   the run-time check chose cuDNN) and its error is at most twice
   blockwise's bf16 error plus 1e-3. Also times forward+backward of both
   (median of 20).
2. `ragged`: dropless MoE on an expert mesh over every GPU (needs 2 or more)
   with the real `jax.lax.ragged_all_to_all` against the padded emulation
   that CPU tests use: kept mask, outputs and gradients (f32, matmul precision
   'highest', atol 1e-5), worst-case buffer and a bounded one with overflow.

Every case runs in a process of its own, so a crash (a CUDA error aborts
the process) costs that case only: its line then says `ok: false` with the
end of its stderr. Prints one JSON line per case and exits 1 when a case
fails, 0 otherwise. A case this machine cannot run (no Hopper GPU, one
device) is computed where it can be and reported as `skipped`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def packed_rows(B, T, rng):
  """Segment ids of packed rows: 1-9 documents of random length, then padding."""
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    used = int(T * rng.uniform(0.7, 1.0))
    cuts = np.sort(rng.choice(np.arange(1, used), size=rng.integers(0, 9), replace=False))
    for i, (a, z) in enumerate(zip([0, *cuts], [*cuts, used]), 1):
      seg[b, a:z] = i
  return seg


def _timed(fn, *args, reps=20):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def check_cudnn(small: bool, window_eighths: int) -> dict:
  from gemjax.kernels import naive_attention, platform
  from gemjax.model import attention as attn
  from gemjax.model.info import SequenceInfo
  B, T, H, G, K = (2, 256, 4, 2, 64) if small else (4, 4096, 16, 4, 128)
  window = T * window_eighths // 8
  rng = np.random.default_rng(0)
  seg = packed_rows(B, T, rng)
  info = SequenceInfo(jnp.zeros((B, T, 3), jnp.int32), jnp.asarray(seg),
                      jnp.zeros((B, T), jnp.int32),
                      jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                      jnp.zeros((B, T), jnp.int8))
  q32, ct = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(2))
  k32, v32 = (jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32) for _ in range(2))
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))

  def vg(kernel):
    def loss(q, k, v):
      o = kernel(q, k, v, info, causal=True, window=window)
      return jnp.sum(o.astype(jnp.float32) * ct), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  with jax.default_matmul_precision('highest'):
    (_, want), want_g = vg(naive_attention)(q32, k32, v32)
  errors, ms, outs = {}, {}, {}
  for name, kernel in (('cudnn', attn.cudnn_kernel), ('blockwise', attn.blockwise_kernel)):
    fn = vg(kernel)
    (_, o), g = fn(q16, k16, v16)
    outs[name] = o.astype(jnp.float32)
    errors[name] = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
                    for a, b in zip((o, *g), (want, *want_g))]
    ms[name] = _timed(fn, q16, k16, v16)
    if name == 'cudnn':
      hlo = fn.lower(q16, k16, v16).compile().as_text()
      calls = sorted({c for c in ('__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward')
                      if c in hlo})
  row = dict(check='cudnn', shape=[B, T, H, G, K], window=window,
             mask_ok=bool(platform.cudnn_mask_ok(info)), cudnn_calls=calls,
             max_err_out_dq_dk_dv={k: [f'{e:.2e}' for e in v] for k, v in errors.items()},
             fwd_bwd_ms={k: round(v, 3) for k, v in ms.items()},
             cudnn_over_blockwise=round(ms['cudnn'] / ms['blockwise'], 3),
             backend=jax.default_backend())
  if not platform.cudnn_static_ok(q16, k16, True, window, jax.default_backend()):
    return row | dict(ok=True, skipped='cuDNN cannot run here (needs a Hopper GPU, cuDNN '
                      '>= 9.6); the numbers above are the blockwise fallback')
  direct = jax.jit(functools.partial(platform.cudnn_attention, causal=True,
                                     window=window))(q16, k16, v16, info)
  to_direct = float(jnp.max(jnp.abs(outs['cudnn'] - direct.astype(jnp.float32))))
  to_fallback = float(jnp.max(jnp.abs(outs['cudnn'] - outs['blockwise'])))
  ran_fused = to_direct < to_fallback
  bound = [2 * b + 1e-3 for b in errors['blockwise']]
  ok = bool(calls) and ran_fused and all(c <= b for c, b in zip(errors['cudnn'], bound))
  return row | dict(ok=ok, ran_fused=ran_fused, diff_to_direct=f'{to_direct:.2e}',
                    diff_to_blockwise=f'{to_fallback:.2e}')


def check_ragged(small: bool, factor: float) -> dict:
  from gemjax.model import moe
  from gemjax.parallel import expert as expert_lib
  from gemjax.parallel import sharding as shd
  P = jax.device_count()
  if P < 2 or jax.default_backend() == 'cpu':
    return dict(check='ragged', ok=True, buffer_factor=factor, skipped=(
        f'needs 2 or more GPUs/TPUs; {P} {jax.default_backend()} device(s) here'))
  E = P * (1 if small else 2)
  Kk, D, F = 2, (32 if small else 256), (16 if small else 512)
  B, T = P * 2, (16 if small else 256)
  names = (moe._W_IN_NAMES, moe._W_IN_NAMES, moe._W_OUT_NAMES)
  mesh = shd.make_mesh({a: 1 for a in shd.MESH_AXES} | {'expert': P})
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (B, T, D))
  # Skewed routing: half the tokens prefer expert 0, so a bound overflows.
  logits = jax.random.normal(ks[1], (B, T, E)).at[:, : T // 2, 0].add(4.0)
  expert, gate, _ = moe.top_k_routing(logits, Kk, renormalize=True)
  valid = np.ones((B, T), bool)
  for b in range(B):
    valid[b, T - (b * 3) % T:] = False          # uneven padding
  w = tuple(jax.random.normal(k, s) / math.sqrt(s[1]) for k, s in
            zip(jax.random.split(ks[2], 3), ((E, D, F), (E, D, F), (E, F, D))))
  r = jax.random.normal(ks[3], (B, T, D))

  def run(emulate, factor):
    def f(x, gate, w):
      return expert_lib.dispatch_combine(
          x, expert, gate, jnp.asarray(valid), w, names, moe.SWIGLU_EXPERTS, num_experts=E,
          path='dropless', dropless_buffer_factor=factor, emulate_ragged=emulate)

    def loss(x, gate, w):
      return jnp.sum(f(x, gate, w)[0] * r)

    fn = jax.jit(lambda x, gate, w: (f(x, gate, w), jax.grad(loss, argnums=(0, 1, 2))(x, gate, w)))
    with shd.use_mesh(mesh), jax.default_matmul_precision('highest'):
      hlo = fn.lower(x, gate, w).as_text()
      out = jax.tree.map(np.asarray, fn(x, gate, w))
    return out, hlo.count('ragged_all_to_all')

  (real, n_real), (emul, _) = run(False, factor), run(True, factor)
  (y1, kept1), g1 = real
  (y0, kept0), g0 = emul
  err = max(float(np.max(np.abs(a - b))) for a, b in
            zip(jax.tree.leaves((y1, g1)), jax.tree.leaves((y0, g0))))
  same_kept = bool(np.array_equal(kept1, kept0))
  return dict(check='ragged', ok=same_kept and err <= 1e-5 and n_real > 0,
              devices=P, buffer_factor=factor, ragged_ops=n_real, kept_equal=same_kept,
              dropped=int(np.sum(~kept1 & valid[..., None])), max_abs_diff=f'{err:.2e}')


CASES = {'cudnn': ('0', '1'), 'ragged': ('0', '1')}   # window in T/8; buffer factor


def run_case(case: str, small: bool) -> dict:
  name, arg = case.split(':')
  if name == 'cudnn':
    return check_cudnn(small, int(arg))
  return check_ragged(small, float(arg))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--small', action='store_true', help='tiny shapes (a dry run)')
  ap.add_argument('--checks', default='cudnn,ragged')
  ap.add_argument('--case', help='one case, in this process (what the driver runs)')
  args = ap.parse_args()
  if args.case:
    print(json.dumps(run_case(args.case, args.small)), flush=True)
    return
  failed = False
  for name in args.checks.split(','):
    for arg in CASES[name]:
      case = f'{name}:{arg}'
      out = subprocess.run([sys.executable, __file__, '--case', case] +
                           (['--small'] if args.small else []),
                           capture_output=True, text=True)
      lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
      row = json.loads(lines[-1]) if lines and out.returncode == 0 else dict(
          check=name, case=case, ok=False, returncode=out.returncode,
          error=out.stderr[-2000:])
      print(json.dumps(row), flush=True)
      failed |= not row['ok']
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
