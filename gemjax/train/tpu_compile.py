"""Real ahead-of-time compiles of the train step for a TPU topology, on any host.

`jax.eval_shape` (gemjax.train.aot's abstract check) sees parameters and
optimizer state but not activations: whether a preset *fits* a chip is
only known once XLA has compiled the step. With libtpu installed (the `tpu`
extra), `jax.experimental.topologies.get_topology_desc` describes a TPU
slice (e.g. 'v5p:4x4x4', 64 chips) without any TPU attached, and the real
train step (same jit, shardings and donation as `Trainer`) is lowered and
compiled for it on a CPU host. XLA's memory analysis then gives per-chip
argument, output and temporary bytes, and its cost analysis the FLOPs.

    python -m gemjax.train.aot configs/flash.yaml --topology v5p:4x4x4

Peak per chip = arguments + outputs - aliased (donated) + temporaries +
generated code: what must be resident at once while the step runs.
`compile_for_topology` reports it against the chip's HBM; the CLI exits 3
when it does not fit. Nothing here runs on a TPU: these are compiler
numbers, not measurements.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemjax import batch as batch_lib
from gemjax import config as config_lib
from gemjax.errors import ConfigError
from gemjax.model import flops as flops_lib
from gemjax.parallel import mesh as mesh_lib
from gemjax.parallel import sharding as shd
from gemjax.train import state as S

# HBM per chip from the Cloud TPU datasheets, by `device_kind`.
HBM_BYTES = {
    'TPU v4': 32 * 2**30,
    'TPU v5 lite': 16 * 10**9,     # v5e
    'TPU v5': 95.74 * 10**9,       # v5p
    'TPU v6 lite': 32 * 10**9,     # v6e (Trillium)
}


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The devices of a TPU topology such as 'v5p:4x4x4' (needs libtpu);
  `num_slices` > 1: that many such slices (multislice, joined over DCN), each
  device carrying its `slice_index`."""
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the chips it
  # drives; describing a topology drives none, so let several compiles (or a
  # compile next to a CPU job) run at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies
    kwargs = {'num_slices': num_slices} if num_slices > 1 else {}
    topo = topologies.get_topology_desc(platform='tpu', topology_name=topology, **kwargs)
  except Exception as e:   # no libtpu, or an unknown topology name
    raise ConfigError(
        f'cannot describe TPU topology {topology!r}: {type(e).__name__}: {e}. It needs '
        "libtpu (pip install 'gemjax[tpu]') and a name like 'v5p:2x2x1', 'v5p:4x4x4', "
        "'v5e:4x4' or 'v4:2x2x2'") from e
  return list(topo.devices)


def tpu_config(cfg: config_lib.Config) -> config_lib.Config:
  """`cfg` as it would resolve on a TPU: 'auto' compute dtype -> bfloat16
  (this host is not the target, so its own backend must not decide)."""
  if cfg.model.compute_dtype == 'auto':
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype='bfloat16'))
  return cfg


def abstract_batch(cfg: config_lib.Config, mesh) -> dict:
  """The train batch as ShapeDtypeStructs with the trainer's shardings."""
  B, T = cfg.train.batch_size, cfg.train.seq_len
  shapes = {}
  for key in batch_lib.REQUIRED_KEYS:
    spec = batch_lib.key_spec(key)
    shape = (B, T, 3) if key == 'positions' else (B, T)
    shapes[key] = (shape, spec.dtype)
  dims = batch_lib.patch_dims(cfg.model)
  for m, budget in batch_lib.patch_budgets(cfg.data).items():
    if m not in dims:
      continue
    patches, slots = batch_lib.patch_keys(m)
    shapes[patches] = ((B, budget, dims[m]), np.dtype(np.float32))
    shapes[slots] = ((B, budget), np.dtype(np.int32))
  if cfg.mesh.context > 1:   # what the layout hook adds
    shapes['token_index'] = ((B, T), np.dtype(np.int32))
    shapes['target_modality'] = ((B, T), np.dtype(np.int8))
  shards = S.batch_shardings(mesh, {k: len(s) for k, (s, _) in shapes.items()})
  return {k: jax.ShapeDtypeStruct(s, d, sharding=shards[k]) for k, (s, d) in shapes.items()}


def compile_for_topology(cfg: config_lib.Config, topology: str, num_slices: int = 1) -> dict:
  """Compiles one train step of `cfg` for `topology` (x `num_slices` slices
  joined over DCN: the mesh is the trainer's hybrid mesh from mesh.dcn_*);
  returns sizes and timings."""
  if num_slices < 1:
    raise ConfigError(f'--slices {num_slices}: the number of slices must be >= 1')
  devices = topology_devices(topology, num_slices)
  cfg = tpu_config(cfg)
  config_lib.validate(cfg)
  dcn = mesh_lib.dcn_shape(cfg.mesh)
  if math.prod(dcn.values()) != num_slices:
    raise ConfigError(f'{num_slices} slice(s) of {topology!r}, but the DCN sizes mesh.dcn_* '
                      f'{ {a: n for a, n in dcn.items() if n > 1} } multiply to '
                      f'{math.prod(dcn.values())}: set mesh.dcn_data (or dcn_fsdp) so that '
                      f'they multiply to {num_slices}')
  sizes = mesh_lib.validate_mesh(cfg, len(devices))
  total = mesh_lib.total_shape(sizes, dcn)
  if math.prod(total.values()) != len(devices):
    raise ConfigError(f'mesh {total} uses {math.prod(total.values())} devices; topology '
                      f'{topology!r} x {num_slices} slice(s) has {len(devices)}')
  shape = tuple(sizes[a] for a in shd.MESH_AXES)
  if num_slices > 1:
    # What the trainer builds: create_hybrid_device_mesh over the slices.
    mesh = shd.make_mesh(sizes, devices, dcn=dcn)
  else:
    from jax.experimental import mesh_utils
    try:
      grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except NotImplementedError:
      # e.g. fsdp 16 x expert 16 on a 8x8x4 torus: each logical axis spans
      # parts of physical ones (fine for compiling; slower collectives on a pod).
      grid = mesh_utils.create_device_mesh(shape, devices=devices,
                                           allow_split_physical_axes=True)
    mesh = jax.sharding.Mesh(grid, shd.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  mdef = S.model_def(cfg.model)
  tx = S.make_optimizer(cfg.optimizer, cfg.train.steps, mdef.groups)
  state_shards = S.state_shardings(mdef, tx, mesh)
  state = S.abstract_state(mdef, tx, mesh)
  batch = abstract_batch(cfg, mesh)
  step = S.jit_train_step(
      S.make_train_step(mdef, tx, cfg.model, S.lr_schedule(cfg.optimizer, cfg.train.steps)),
      state_shards, {k: v.sharding for k, v in batch.items()})
  t0 = time.perf_counter()
  with shd.use_mesh(mesh):
    lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  kind = devices[0].device_kind
  asked = lowered.as_text()     # what gemjax gave the compiler (StableHLO)
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  B, T = cfg.train.batch_size, cfg.train.seq_len
  return {
      'topology': topology if num_slices == 1 else f'{num_slices} x {topology}',
      'device_kind': kind, 'devices': len(devices), 'mesh': total,
      'params': S.param_count(mdef),
      'argument_bytes': mem.argument_size_in_bytes, 'output_bytes': mem.output_size_in_bytes,
      'alias_bytes': mem.alias_size_in_bytes, 'temp_bytes': mem.temp_size_in_bytes,
      'code_bytes': mem.generated_code_size_in_bytes, 'peak_bytes': peak,
      'hbm_bytes': HBM_BYTES.get(kind),
      # XLA's count is per device (one SPMD program); ours is for the whole step.
      'xla_flops_per_device': float(cost.get('flops', float('nan'))),
      'model_flops_per_device': flops_lib.train_flops_per_step(mdef.spec, B, T) / len(devices),
      'lower_s': t1 - t0, 'compile_s': t2 - t1,
      # What the TPU compiler was given beyond plain XLA ops: gemjax's Pallas
      # (Mosaic) kernels, e.g. splash attention, and the dropless exchange.
      # Counted before compiling: XLA:TPU adds custom calls of its own.
      'pallas_calls': asked.count('custom_call @tpu_custom_call('),
      'ragged_all_to_all': asked.count('ragged_all_to_all('),
  }


def fits(report: dict) -> bool:
  return report['hbm_bytes'] is None or report['peak_bytes'] <= report['hbm_bytes']


def format_report(path: str, r: dict) -> str:
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  hbm = 'unknown HBM' if r['hbm_bytes'] is None else f"HBM {gib(r['hbm_bytes'])}"
  verdict = 'fits' if fits(r) else 'DOES NOT FIT'
  return (f"{path} on {r['topology']} ({r['devices']} x {r['device_kind']}, mesh "
          f"{ {k: v for k, v in r['mesh'].items() if v > 1} }): per chip arguments "
          f"{gib(r['argument_bytes'])}, outputs {gib(r['output_bytes'])} (donated "
          f"{gib(r['alias_bytes'])}), temporaries {gib(r['temp_bytes'])}, code "
          f"{gib(r['code_bytes'])}; peak {gib(r['peak_bytes'])} vs {hbm}: {verdict}. "
          f"FLOPs per chip: XLA {r['xla_flops_per_device']:.3g}, gemjax "
          f"{r['model_flops_per_device']:.3g} (x{r['xla_flops_per_device'] / r['model_flops_per_device']:.2f}). "
          f"Lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s."
          + (f" Pallas kernel calls: {r['pallas_calls']}." if r.get('pallas_calls') else '')
          + (f" ragged-all-to-all ops: {r['ragged_all_to_all']}."
             if r.get('ragged_all_to_all') else ''))
