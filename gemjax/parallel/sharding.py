"""The mesh and the tables from logical axis names to mesh axes.

Layers name the axes of their parameters and activations with *logical* names
('embed', 'heads', 'mlp', 'batch', ...). Only this module maps them to mesh
axes (the axis names and the table `LOGICAL_AXIS_RULES` are plain data in
`gemjax.parallel.axes`, re-exported here). Swapping a parallelism strategy
is swapping `LOGICAL_AXIS_RULES`; the few places that need another
mapping (inside the expert shard_map) name a rule set from `RULE_SETS`.

`constrain(x, names)` is the activation hook the model calls: a sharding
constraint under a mesh, a no-op outside one (unit tests of single layers).

Imports jax, numpy, `gemjax.errors` and `gemjax.parallel.axes` only.
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from gemjax.errors import ConfigError

# Re-exported: callers read `sharding.MESH_AXES` / `sharding.BATCH_AXES` /
# `sharding.LOGICAL_AXIS_RULES` (the table is plain data in `axes`, so the
# jax-free config checks of `gemjax.parallel.mesh` read the same one).
from gemjax.parallel.axes import BATCH_AXES, LOGICAL_AXIS_RULES, MESH_AXES  # noqa: F401

# Named rule sets; each is the default table with a few names overridden.
RULE_SETS: dict[str, dict[str, Any]] = {
    'default': LOGICAL_AXIS_RULES,
    # Inside the expert shard_map weights keep only their expert (and tensor)
    # split; the fsdp split of the model width is gathered at the map boundary
    # (ZeRO-3).
    'expert_map': LOGICAL_AXIS_RULES | {'expert_embed': None, 'embed': None},
}


def rule_set(name: str) -> dict[str, Any]:
  """The rule set called `name` (see `RULE_SETS`)."""
  if name not in RULE_SETS:
    raise KeyError(f'rule set {name!r} is unknown: one of {sorted(RULE_SETS)}')
  return RULE_SETS[name]


def logical_to_spec(names: Sequence[str | None], mesh: Any = None,
                    rules: str | Mapping[str, Any] | None = None) -> P:
  """Maps logical names to a PartitionSpec, dropping mesh axes of size 1.

  A mesh axis is used at most once per spec (the first dimension wins), and an
  axis the mesh lacks is dropped, so the same names work on any mesh shape.
  `rules` is a table, the name of one in `RULE_SETS`, or None (the default).
  """
  if rules is None:
    rules, table_name = LOGICAL_AXIS_RULES, 'LOGICAL_AXIS_RULES'
  elif isinstance(rules, str):
    rules, table_name = rule_set(rules), f'rule set {rules!r}'
  else:
    table_name = 'the given rules'
  axis_sizes = dict(mesh.shape) if mesh is not None else None
  used: set[str] = set()
  out = []
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise KeyError(f'logical axis {name!r} has no rule in {table_name}')
    target = rules[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    keep = []
    for a in axes:
      if a in used:
        continue
      if axis_sizes is not None and axis_sizes.get(a, 1) == 1:
        continue
      keep.append(a)
      used.add(a)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


# TPU kinds whose physical axes jax.make_mesh may split (it does so for v5e).
_SPLIT_PHYSICAL_AXES_KINDS = ('TPU v5 lite', 'TPU v5e')


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None, *,
              dcn: Mapping[str, int] | None = None) -> jax.sharding.Mesh:
  """A mesh with the five gemjax axes, in Auto (propagating) mode, laid out
  on the physical topology.

  `axis_sizes` are the sizes within one slice (the ICI part); `dcn` says how
  many slices each axis spans over the data-center network (missing axes: 1).
  Each mesh axis then has ici x dcn devices. With one slice, `jax.make_mesh`
  orders the devices for the torus (reshaping `jax.devices()` would not);
  with several, `create_hybrid_device_mesh` builds that mesh once per slice
  and tiles the slices along the DCN axes, so only the DCN part of an axis
  crosses slices. `devices` defaults to `jax.devices()`; `jax.make_mesh`
  takes the first ones when there are more than the mesh needs.
  """
  ici_shape = tuple(axis_sizes[a] for a in MESH_AXES)
  dcn = {a: 1 for a in MESH_AXES} | dict(dcn or {})
  unknown = sorted(set(dcn) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'DCN sizes {unknown} name no mesh axis: one of {MESH_AXES}')
  dcn_shape = tuple(dcn[a] for a in MESH_AXES)
  devices = list(jax.devices() if devices is None else np.asarray(devices).ravel())
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn_shape) == 1:
    slices = _granules(devices, 'slice_index')
    if len(slices) > 1:
      raise ConfigError(
          f'the {len(devices)} devices form {len(slices)} slices (slice_index '
          f'{sorted(slices)}), but the mesh has no DCN axis: set mesh.dcn_data (or '
          f'mesh.dcn_fsdp) so that the DCN sizes multiply to {len(slices)}')
    return jax.make_mesh(ici_shape, MESH_AXES, axis_types=auto, devices=devices)
  return jax.sharding.Mesh(device_grid(ici_shape, dcn_shape, devices), MESH_AXES,
                           axis_types=auto)


def _granules(devices: Sequence[Any], attr: str) -> set[int]:
  return {getattr(d, attr) for d in devices if hasattr(d, attr)}


class _EmulatedSliceDevice:
  """A device seen as part of an emulated slice (see `device_grid`)."""

  def __init__(self, device: Any, slice_index: int):
    self.device = device
    self.slice_index = slice_index

  def __getattr__(self, name: str) -> Any:
    return getattr(self.device, name)


def device_grid(ici_shape: Sequence[int], dcn_shape: Sequence[int],
                devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as ici x dcn per axis, by `create_hybrid_device_mesh`.

  The units joined over DCN are TPU slices (`slice_index`); on platforms
  without slices, processes (one GPU host each), when there are as many as
  the DCN sizes multiply to; in one process without slices (CPU tests, one
  GPU host) equal runs of consecutive devices are emulated slices, so the
  same config runs, with the same device order, everywhere.
  """
  ici_shape, dcn_shape = tuple(ici_shape), tuple(dcn_shape)
  n_dcn, n_ici = math.prod(dcn_shape), math.prod(ici_shape)
  where = (f'the mesh ({_fmt_shape(ici_shape)} per slice, DCN '
           f'{_fmt_shape(dcn_shape)})')
  if min(dcn_shape) < 1 or len(dcn_shape) != len(ici_shape):
    raise ConfigError(f'{where}: DCN sizes must be positive, one per mesh axis')
  if len(devices) != n_ici * n_dcn:
    raise ConfigError(f'{where} needs {n_ici} x {n_dcn} = {n_ici * n_dcn} devices, '
                      f'got {len(devices)}')
  process_is_granule = False
  if _granules(devices, 'slice_index'):
    kind, attr = 'slices (slice_index)', 'slice_index'
  elif len(_granules(devices, 'process_index')) > 1:
    kind, attr, process_is_granule = 'processes', 'process_index', True
  else:
    kind, attr = 'emulated slices', 'slice_index'
    devices = [_EmulatedSliceDevice(d, i // n_ici) for i, d in enumerate(devices)]
  per_unit = collections.Counter(getattr(d, attr) for d in devices)
  if len(per_unit) != n_dcn:
    raise ConfigError(
        f'{where}: the {len(devices)} devices form {len(per_unit)} {kind}, but the '
        f'DCN sizes (mesh.dcn_*) multiply to {n_dcn}; make their product {len(per_unit)}')
  if set(per_unit.values()) != {n_ici}:
    raise ConfigError(
        f'{where}: each of the {kind} must hold {n_ici} devices (the per-slice axes '
        f'multiply to {n_ici}), but they hold {dict(sorted(per_unit.items()))}')
  split = any(k in str(devices[0].device_kind) for k in _SPLIT_PHYSICAL_AXES_KINDS)
  grid = mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=process_is_granule,
      allow_split_physical_axes=split)
  unwrap = np.vectorize(lambda d: d.device if isinstance(d, _EmulatedSliceDevice) else d,
                        otypes=[object])
  return unwrap(grid)


def _fmt_shape(shape: Sequence[int]) -> str:
  return ', '.join(f'{a}={n}' for a, n in zip(MESH_AXES, shape))


def single_device_mesh() -> jax.sharding.Mesh:
  return make_mesh({a: 1 for a in MESH_AXES}, devices=jax.devices()[:1])


def current_mesh() -> Any:
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def target_platform() -> str:
  """The platform being traced for: the ambient mesh's devices ('tpu' when
  compiling for a TPU topology on a CPU host, `gemjax.train.tpu_compile`),
  else the default backend. 'gpu' for CUDA and ROCm alike."""
  mesh = current_mesh()
  device = getattr(mesh, 'abstract_device', None) if mesh is not None else None
  platform = getattr(device, 'platform', None) or jax.default_backend()
  return 'gpu' if platform in ('cuda', 'rocm') else platform


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical names under the current mesh; else no-op."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh))


def named_sharding(mesh: jax.sharding.Mesh, names: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, mesh))


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh):
  """Makes `mesh` the ambient mesh for `constrain` and shard_map helpers."""
  with jax.set_mesh(mesh):
    yield mesh
