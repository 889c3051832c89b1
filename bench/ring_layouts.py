"""Ring attention by layout: total work counted in the kernel, and fwd+bwd time.

    python bench/ring_layouts.py [--seqs 4096 8192] [--rounds 3] [--block 512]

Setting as bench/long_context.py: B=1, 8 heads (MHA), head dim 64, float32,
causal, one document, 8 emulated CPU devices on the 'context' axis. For each
layout (contiguous, zigzag, striped), with query/key chunks capped at half a
device's shard (`ring_attention.HALF_CHUNKS`, the default) and without the
cap (the previous behaviour), it reports

  - chunk pairs the forward kernel computes, counted in the kernel
    (`flash.count_computed_chunks`), in total and on the busiest device, as
    multiples of the contiguous layout's total (block^2 area, so chunk sizes
    compare);
  - fwd+bwd wall time, fastest of `--rounds` rounds interleaved over all
    configurations (the emulated devices share the host's cores, so wall time
    is the sum of all devices' work: total work, not balance, is what it
    shows).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemjax.kernels import flash  # noqa: E402
from gemjax.model.info import SequenceInfo  # noqa: E402
from gemjax.parallel import layouts  # noqa: E402
from gemjax.parallel import ring_attention as ring  # noqa: E402
from gemjax.parallel import sharding as shd  # noqa: E402

H, K, N = 8, 64, 8


def _inputs(S, layout):
  perm = layouts.layout_permutation(S, N, layout)
  rng = np.random.default_rng(0)
  q, k, v, ct = (jnp.asarray(rng.normal(size=(1, S, H, K)), jnp.float32) for _ in range(4))
  ones = jnp.ones((1, S), jnp.int32)
  info = SequenceInfo(jnp.zeros((1, S, 3), jnp.int32), ones, 0 * ones,
                      jnp.asarray(perm[None], jnp.int32), jnp.zeros((1, S), jnp.int8))
  return q, k, v, ct, info, perm


def _build(S, layout, block, half):
  """A jitted fwd+bwd (traced with HALF_CHUNKS = half) and the kernel's chunk count."""
  q, k, v, ct, info, perm = _inputs(S, layout)
  ring.HALF_CHUNKS = half
  try:
    attn = lambda q, k, v: ring.ring_attention(q, k, v, info, block=block)
    with flash.count_computed_chunks() as seen:
      jax.block_until_ready(jax.jit(lambda q, k, v: attn(q, k, v))(q, k, v))
    local = S // N
    device_of = np.repeat(np.arange(N), local)[np.argsort(perm)]  # original index -> device
    per_device = np.bincount([device_of[q_lo] for q_lo, _ in seen], minlength=N)
    chunk = min(block, local // 2) if half else block
    area = chunk * chunk
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * ct), argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    compile_s = time.perf_counter() - t0
  finally:
    ring.HALF_CHUNKS = True
  return step, (q, k, v), per_device.sum() * area, per_device.max() * area, compile_s


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--seqs', type=int, nargs='+', default=[4096, 8192])
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--block', type=int, default=512)
  args = ap.parse_args(argv)
  mesh = shd.make_mesh({'data': 1, 'fsdp': 1, 'expert': 1, 'context': N, 'tensor': 1})
  print(f'jax {jax.__version__}, {jax.device_count()} emulated devices on {os.cpu_count()} '
        f'cores; block {args.block}; B=1, {H} heads x {K}, f32, causal')
  print('| S | layout | chunks capped at half a shard | total work (x contiguous) | '
        'busiest device (x contiguous total / 8) | fwd+bwd s (min) | x contiguous time |')
  print('|---|---|---|---|---|---|---|')
  with shd.use_mesh(mesh):
    for S in args.seqs:
      cases = {}
      for half in (True, False):
        for layout in layouts.LAYOUTS:
          cases[(layout, half)] = _build(S, layout, args.block, half)
      times = {key: [] for key in cases}
      for _ in range(args.rounds):
        for key, (step, xs, *_rest) in cases.items():
          t0 = time.perf_counter()
          jax.block_until_ready(step(*xs))
          times[key].append(time.perf_counter() - t0)
      for half in (True, False):
        base_work = cases[('contiguous', half)][2]
        base_time = min(times[('contiguous', half)])
        for layout in layouts.LAYOUTS:
          _, _, total, busiest, _ = cases[(layout, half)]
          t = min(times[(layout, half)])
          print(f"| {S} | {layout} | {'yes' if half else 'no (before)'} | "
                f'{total / base_work:.2f} | {busiest / (base_work / N):.2f} | {t:.2f} | '
                f'{t / base_time:.2f} |', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
