"""The mesh and the tables from logical axis names to mesh axes.

Layers name the axes of their parameters and activations with *logical* names
('embed', 'heads', 'mlp', 'batch', ...). Only this module maps them to mesh
axes (the axis names and the table `LOGICAL_AXIS_RULES` are plain data in
`gemjax.parallel.axes`, re-exported here). Swapping a parallelism strategy
is swapping `LOGICAL_AXIS_RULES`; the few places that need another
mapping (inside the expert shard_map) name a rule set from `RULE_SETS`.

`constrain(x, names)` is the activation hook the model calls: a sharding
constraint under a mesh, a no-op outside one (unit tests of single layers).

Imports jax, numpy and `gemjax.parallel.axes` only.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

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


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[Any] | None = None,
              dcn_data: int = 1) -> jax.sharding.Mesh:
  """A mesh with the five gemjax axes, in Auto (propagating) mode.

  With `dcn_data > 1` (several slices joined over the data-center network) the
  data axis spans slices: the device order puts slice boundaries on `data`.
  """
  shape = tuple(axis_sizes[a] for a in MESH_AXES)
  if dcn_data > 1:
    shape = (shape[0] * dcn_data,) + shape[1:]
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  devices = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(devices, MESH_AXES, axis_types=auto)


def single_device_mesh() -> jax.sharding.Mesh:
  return make_mesh({a: 1 for a in MESH_AXES}, devices=jax.devices()[:1])


def current_mesh() -> Any:
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


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
