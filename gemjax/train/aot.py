"""Abstract evaluation of a preset on its intended mesh, without allocating.

`abstract_check(cfg, mesh_sizes)` traces parameter init and one train step
with `jax.eval_shape` under an `AbstractMesh` of the intended shape (e.g. a
v5p pod slice), checks that every sharded dimension divides evenly, and
returns parameter counts and per-device bytes. Nothing is allocated, so a
1-trillion-parameter preset checks in seconds on a laptop.

    python -m gemjax.train.aot configs/pro.yaml     # uses the preset's mesh
    python -m gemjax.train.aot configs/flash.yaml --topology v5p:4x4x4   # real compile
    python -m gemjax.train.aot configs/flash.yaml --topology v5p:4x4x4 --slices 2 \
        mesh.dcn_data=2                                   # two slices over DCN

With `--topology`, the step is compiled for real for that TPU slice
(`gemjax.train.tpu_compile`, needs libtpu) and its per-chip memory is
compared with the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gemjax import config as config_lib
from gemjax.errors import ConfigError
from gemjax.model import flops as flops_lib
from gemjax.parallel import mesh as mesh_lib
from gemjax.parallel import sharding as shd
from gemjax.train import state as S


def _spec_divides(shape, spec, sizes, where) -> int:
  """Checks divisibility; returns the number of shards of this array."""
  shards = 1
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    n = math.prod(sizes[a] for a in axes)
    if dim % n:
      raise ConfigError(f'{where}: dimension {dim} is split over mesh axes {axes} '
                        f'of total size {n}, which does not divide it')
    shards *= n
  return shards


def abstract_check(cfg: config_lib.Config, mesh_sizes: dict[str, int]) -> dict:
  sizes = {a: 1 for a in shd.MESH_AXES} | dict(mesh_sizes)
  num_devices = math.prod(sizes.values())
  config_lib.validate(cfg)
  one_slice = dict.fromkeys(mesh_lib.DCN_KEYS, 1)   # `sizes` are the whole mesh's
  intended = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **one_slice, **sizes))
  mesh_lib.validate_mesh(intended, num_devices)
  mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in shd.MESH_AXES), shd.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 5)
  mdef = S.model_def(cfg.model)
  tx = S.make_optimizer(cfg.optimizer, cfg.train.steps, mdef.groups)
  abs_opt = jax.eval_shape(tx.init, mdef.abstract_params)
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': mdef.abstract_params,
           'opt_state': abs_opt}
  # Per-device bytes of the parameters (+ Adam moments, same layout).
  param_bytes = 0
  flat_axes = dict(jax.tree_util.tree_leaves_with_path(mdef.logical_axes, is_leaf=S._is_axes))
  for path, leaf in jax.tree_util.tree_leaves_with_path(mdef.abstract_params):
    spec = shd.logical_to_spec(flat_axes[path], mesh)
    shards = _spec_divides(leaf.shape, spec, sizes, jax.tree_util.keystr(path))
    param_bytes += leaf.size * leaf.dtype.itemsize // shards
  B, T = cfg.train.batch_size, cfg.train.seq_len
  batch = {
      'tokens': jax.ShapeDtypeStruct((B, T), jnp.int32),
      'modality': jax.ShapeDtypeStruct((B, T), jnp.int8),
      'positions': jax.ShapeDtypeStruct((B, T, 3), jnp.int32),
      'segment_ids': jax.ShapeDtypeStruct((B, T), jnp.int32),
      'block_ids': jax.ShapeDtypeStruct((B, T), jnp.int32),
      'targets': jax.ShapeDtypeStruct((B, T), jnp.int32),
      'loss_weights': jax.ShapeDtypeStruct((B, T), jnp.float32),
  }
  step = S.make_train_step(mdef, tx, cfg.model, S.lr_schedule(cfg.optimizer, cfg.train.steps))
  with jax.sharding.use_abstract_mesh(mesh):
    new_state, metrics = jax.eval_shape(step, state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  n_params = S.param_count(mdef)
  return {
      'params': n_params,
      'active_params_per_token': flops_lib.matmul_params_per_token(mdef.spec),
      'devices': num_devices,
      'param_bytes_per_device': param_bytes,
      'state_bytes_per_device': 3 * param_bytes,   # params + Adam mu + nu (f32)
      'train_flops_per_step': flops_lib.train_flops_per_step(mdef.spec, B, T),
      'loss_shape': tuple(metrics['loss'].shape),
  }


EXIT_DOES_NOT_FIT = 3


def main(argv=None) -> int:
  """python -m gemjax.train.aot CONFIG [--topology v5p:4x4x4 [--slices N] [--hbm-gib G]] [key=value ...]

  Without --topology: the abstract check (shapes, shardings, per-device
  state). With it: a real compile of the train step for that TPU topology
  (gemjax.train.tpu_compile; needs libtpu), per-chip memory vs HBM;
  `--slices N` compiles for N such slices joined over DCN (multislice; the
  config's mesh.dcn_* sizes must multiply to N); exit
  code 3 when the step does not fit (--hbm-gib overrides the chip's HBM,
  e.g. to demand headroom).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  topology, hbm_gib, slices = None, None, 1
  for flag in ('--topology', '--hbm-gib', '--slices'):
    if flag in argv:
      i = argv.index(flag)
      if i + 1 >= len(argv):
        raise ConfigError(f'{flag} needs a value')
      value = argv.pop(i + 1)
      argv.pop(i)
      if flag == '--topology':
        topology = value
      elif flag == '--slices':
        slices = int(value)
      else:
        hbm_gib = float(value)
  path = argv.pop(0)
  cfg = config_lib.load_config(path, argv)
  if topology:
    from gemjax.train import tpu_compile
    r = tpu_compile.compile_for_topology(cfg, topology, slices)
    if hbm_gib is not None:
      r['hbm_bytes'] = hbm_gib * 2**30
    print(tpu_compile.format_report(path, r))
    if not tpu_compile.fits(r):
      print(f"{path}: the train step needs {r['peak_bytes'] / 2**30:.2f} GiB per chip, more "
            f"than the {r['hbm_bytes'] / 2**30:.2f} GiB of HBM: lower train.batch_size per "
            'chip, set model.remat, model.loss_chunk (large vocabularies) or use more chips',
            file=sys.stderr)
      return EXIT_DOES_NOT_FIT
    return 0
  sizes = {a: getattr(cfg.mesh, a) for a in shd.MESH_AXES}
  if -1 in sizes.values():
    raise ConfigError(f'{path}: the intended mesh must be explicit (no -1) for an abstract check')
  r = abstract_check(cfg, sizes)
  print(f"{path}: {r['params'] / 1e9:.2f} B params ({r['active_params_per_token'] / 1e9:.2f} B "
        f"active per token) on {r['devices']} devices; {r['param_bytes_per_device'] / 2**30:.2f} GiB "
        f"params / {r['state_bytes_per_device'] / 2**30:.2f} GiB train state per device; "
        f"{r['train_flops_per_step']:.3g} FLOPs per step")
  return 0


if __name__ == '__main__':
  sys.exit(main())
