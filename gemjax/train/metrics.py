"""Throughput, MFU and metric writers (console, JSONL, TensorBoard).

MFU = model FLOPs per step (gemjax.model.flops) / step time / peak FLOP/s of
all devices. Peak: the datasheet number per chip on TPU/GPU; on CPU a square
float32 matmul measured at start-up in the same process, so the ratio is
meaningful on a shared, noisy machine.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemjax.train import storage

# Dense bf16 peak FLOP/s per chip from vendor datasheets.
DATASHEET_PEAK = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,   # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,   # Trillium
    'TPU v6e': 918e12,
    'H100': 989e12,          # SXM, dense
    'H200': 989e12,
    'A100': 312e12,
}


def measure_cpu_peak(n: int = 1024, reps: int = 5) -> float:
  """Best-of-`reps` f32 matmul FLOP/s on the default device's CPU."""
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def peak_flops(override: float = 0.0) -> tuple[float, str]:
  """Total peak FLOP/s of the devices and where the number came from."""
  devices = jax.devices()
  if override > 0:
    return override * len(devices), 'config train.peak_flops'
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    return measure_cpu_peak(), 'measured f32 matmul (whole CPU)'
  for name, value in DATASHEET_PEAK.items():
    if name.lower() in kind.lower():
      return value * len(devices), f'datasheet {name} x {len(devices)}'
  return float('nan'), f'unknown device kind {kind!r} (set train.peak_flops)'


class MetricWriter:
  """JSONL always; TensorBoard event files when enabled (primary process only).

  `run_dir` may be a bucket URL (gs://...): both files are then written to a
  local staging folder and copied to it (see `gemjax.train.storage`) at the
  first write, at most every `sync_every_s` seconds after, and on `close`.
  """

  def __init__(self, run_dir: str, *, tensorboard: bool = True, enabled: bool = True,
               sync_every_s: float = 30.0):
    self.enabled = enabled
    self.jsonl = None
    self.tb = None
    self.staged = None
    if not enabled:
      return
    self.staged = storage.StagedDir(run_dir, pull=('metrics.jsonl',), every_s=sync_every_s)
    self.jsonl = open(os.path.join(self.staged.local, 'metrics.jsonl'), 'a')
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(self.staged.local, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = 'train') -> None:
    if not self.enabled:
      return
    clean = {k: _to_float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    self.jsonl.write(json.dumps({'step': step, 'split': prefix, **clean}) + '\n')
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in clean.items():
        self.tb.add_scalar(f'{prefix}/{k}', v, step)
      self.tb.flush()
    self.staged.sync()

  def close(self) -> None:
    if self.jsonl:
      self.jsonl.close()
    if self.tb:
      self.tb.close()
    if self.staged:
      self.staged.close()


def _to_float(v: Any) -> float:
  f = float(np.asarray(v))
  return f if np.isfinite(f) else str(f)  # JSON has no NaN/Inf


def summarize(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Turns the step's sums into means: per-modality loss and accuracy."""
  out = {}
  for k in ('loss', 'nll', 'z_loss', 'aux_loss', 'accuracy', 'grad_norm',
            'learning_rate', 'logit_norm'):
    if k in metrics:
      out[k] = float(np.asarray(metrics[k]))
  for k, v in metrics.items():
    if k.startswith('weight_sum/'):
      name = k.split('/', 1)[1]
      w = float(np.asarray(v))
      if w > 0:
        out[f'loss/{name}'] = float(np.asarray(metrics[f'nll_sum/{name}'])) / w
        out[f'accuracy/{name}'] = float(np.asarray(metrics[f'correct_sum/{name}'])) / w
    elif k.startswith('aux/') and np.ndim(v) <= 1:
      # stacked over scanned layer groups: losses add, other metrics average
      agg = np.sum if k.split('/')[1].endswith('_loss') else np.mean
      out[k] = float(agg(np.asarray(v)))
  return out
