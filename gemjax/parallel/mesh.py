"""The mesh a config asks for on a given number of devices, checked.

`resolve_mesh_shape` fills the one -1 axis of `mesh.*` from the device count;
`validate_mesh` adds the checks that need the resolved sizes (heads, experts,
batch and sequence divisible by the axes they are split over). These are the
config checks that depend on the machine, so they live here and not in
`gemjax.config.validate`, which checks a config on its own.

Pure arithmetic: imports `gemjax.config`, `gemjax.errors` and
`gemjax.parallel.axes` only (no jax), so `aot` and the golden-file tool can
check an intended pod-sized mesh on a laptop.
"""

from __future__ import annotations

import math
from typing import Any

from gemjax.config import Config, MeshConfig
from gemjax.errors import ConfigError
from gemjax.parallel.axes import MESH_AXES


def _fail(key: str, value: Any, valid: str) -> None:
  raise ConfigError(f'{key}={value!r} is invalid: {valid}')


def _fmt(sizes: dict[str, int]) -> str:
  return ', '.join(f'{k}={v}' for k, v in sizes.items())


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with the single -1 filled; errors name the axes and the count."""
  sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      _fail(f'mesh.{a}', s, 'axis sizes are positive, or -1 for "the rest"')
  if len(fill) > 1:
    raise ConfigError(f'mesh: only one axis may be -1, got {fill}')
  fixed = math.prod(s for s in sizes.values() if s != -1) * mesh_cfg.dcn_data
  if fill:
    if num_devices % fixed:
      raise ConfigError(
          f'mesh: the fixed axes {_fmt(sizes)} x dcn_data={mesh_cfg.dcn_data} '
          f'(product {fixed}) do not divide the {num_devices} devices, so '
          f'mesh.{fill[0]}=-1 cannot be filled')
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f'mesh: the product of the axes {_fmt(sizes)} x dcn_data='
        f'{mesh_cfg.dcn_data} is {fixed}, but there are {num_devices} devices; '
        'make the product equal the device count or set one axis to -1')
  return sizes


def validate_mesh(cfg: Config, num_devices: int) -> dict[str, int]:
  """The resolved axis sizes, after checking every split they imply."""
  sizes = resolve_mesh_shape(cfg.mesh, num_devices)
  m = cfg.model
  tp = sizes['tensor']
  if m.num_heads % tp:
    _fail('model.num_heads', m.num_heads,
          f'must be divisible by mesh.tensor={tp} (heads are split over it)')
  if m.num_kv_heads % tp and tp % m.num_kv_heads:
    _fail('model.num_kv_heads', m.num_kv_heads,
          f'must divide or be divisible by mesh.tensor={tp}')
  if m.mlp_dim % tp:
    _fail('model.mlp_dim', m.mlp_dim, f'must be divisible by mesh.tensor={tp}')
  if m.moe.num_experts and m.moe.num_experts % sizes['expert']:
    _fail('model.moe.num_experts', m.moe.num_experts,
          f"must be divisible by mesh.expert={sizes['expert']} (experts are split over it)")
  batch_shards = sizes['data'] * sizes['fsdp'] * sizes['expert'] * cfg.mesh.dcn_data
  if cfg.train.batch_size % batch_shards:
    _fail('train.batch_size', cfg.train.batch_size,
          f'must be divisible by the batch shards data*fsdp*expert*dcn_data={batch_shards}')
  if cfg.train.seq_len % sizes['context']:
    _fail('train.seq_len', cfg.train.seq_len,
          f"must be divisible by mesh.context={sizes['context']}")
  if sizes['context'] > 1 and cfg.mesh.context_layout == 'zigzag' and \
      cfg.train.seq_len % (2 * sizes['context']):
    _fail('train.seq_len', cfg.train.seq_len,
          f"must be divisible by 2 * mesh.context={2 * sizes['context']} for "
          "mesh.context_layout='zigzag' (or use 'striped')")
  return sizes
