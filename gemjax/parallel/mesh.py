"""The mesh a config asks for on a given number of devices, checked.

`resolve_mesh_shape` fills the one -1 axis of `mesh.*` (sizes within one
slice) from the device count; `dcn_shape` says how many slices, joined over
the data-center network, each axis spans (`mesh.dcn_data`, `mesh.dcn_fsdp`);
`validate_mesh` adds the checks that need the resolved sizes: every model
width divisible by the mesh axes `LOGICAL_AXIS_RULES` splits it over (heads,
KV heads, MLP/expert hidden, vocabulary, model width, experts), batch and
sequence divisible by theirs, and an attention kind that can run on a
sequence split over 'context'. These are the config checks that depend on
the machine, so they live here and not in `gemjax.config.validate`, which
checks a config on its own.

Pure arithmetic: imports `gemjax.config`, `gemjax.errors` and
`gemjax.parallel.axes` only (no jax), so `aot` and the golden-file tool can
check an intended pod-sized mesh on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gemjax.config import Config, MeshConfig
from gemjax.errors import ConfigError
from gemjax.parallel.axes import LOGICAL_AXIS_RULES, MESH_AXES, axis_size


def _fail(key: str, value: Any, valid: str) -> None:
  raise ConfigError(f'{key}={value!r} is invalid: {valid}')


def _fmt(sizes: dict[str, int]) -> str:
  return ', '.join(f'{k}={v}' for k, v in sizes.items())


# The `mesh.dcn_<axis>` keys MeshConfig has: how many slices (joined over
# the data-center network) that mesh axis spans. Axes without a key span one.
DCN_KEYS = tuple(f'dcn_{a}' for a in MESH_AXES
                 if f'dcn_{a}' in {f.name for f in dataclasses.fields(MeshConfig)})


def dcn_shape(mesh_cfg: MeshConfig) -> dict[str, int]:
  """Slices each mesh axis spans over DCN (`mesh.dcn_<axis>`; 1 without a key)."""
  return {a: getattr(mesh_cfg, f'dcn_{a}', 1) for a in MESH_AXES}


def total_shape(ici: dict[str, int], dcn: dict[str, int]) -> dict[str, int]:
  """The mesh's axis sizes: the per-slice (ICI) size times the slices (DCN)."""
  return {a: ici[a] * dcn.get(a, 1) for a in MESH_AXES}


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Per-slice (ICI) axis sizes with the single -1 filled; errors name the
  axes and the device count. `mesh.<axis>` is the size within one slice; the
  whole mesh axis is that times `mesh.dcn_<axis>` (see `total_shape`)."""
  sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      _fail(f'mesh.{a}', s, 'axis sizes are positive, or -1 for "the rest"')
  dcn = dcn_shape(mesh_cfg)
  for key in DCN_KEYS:
    if getattr(mesh_cfg, key) < 1:
      _fail(f'mesh.{key}', getattr(mesh_cfg, key),
            'the number of slices (joined over DCN) the axis spans: a positive '
            'integer, 1 = within one slice')
  if len(fill) > 1:
    raise ConfigError(f'mesh: only one axis may be -1, got {fill}')
  slices = math.prod(dcn.values())
  dcn_note = '' if slices == 1 else ' x ' + _fmt({f'dcn_{a}': n for a, n in dcn.items() if n > 1})
  fixed = math.prod(s for s in sizes.values() if s != -1) * slices
  if fill:
    if num_devices % fixed:
      raise ConfigError(
          f'mesh: the fixed axes {_fmt(sizes)}{dcn_note} (product {fixed}) do not '
          f'divide the {num_devices} devices, so mesh.{fill[0]}=-1 cannot be filled')
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f'mesh: the product of the axes {_fmt(sizes)}{dcn_note} is {fixed}, but there '
        f'are {num_devices} devices; make the product equal the device count or set '
        'one axis to -1')
  return sizes


# Widths of the model that parameters (and activations) split over mesh
# axes, by the logical name they carry: (config key, logical name). Which
# mesh axes a name goes to is `LOGICAL_AXIS_RULES`'s business, not this list's.
SPLIT_WIDTHS = (
    ('model.num_heads', 'heads'),
    ('model.num_kv_heads', 'kv_heads'),
    ('model.mlp_dim', 'mlp'),
    ('model.vocab_size', 'vocab'),
    ('model.d_model', 'embed'),
)
MOE_SPLIT_WIDTHS = (
    ('model.moe.num_experts', 'experts'),
    ('model.moe.expert_dim', 'mlp'),
    ('model.d_model', 'expert_embed'),
)

# `model.attention` kinds that work on a sequence split over 'context':
# 'ring' passes K/V shards around the ring; 'dense' is an einsum GSPMD splits
# over the query shards (K/V gathered, [T/N, T] scores per device). Both mask
# by each token's original index, so any `mesh.context_layout` is exact.
# Not here: 'blockwise' (and 'cudnn'/'splash', which fall back to it) would
# all-gather q/k/v and every context shard would compute the whole attention;
# 'infini' scans its memory over segments in array order (a layout would let
# earlier tokens read later ones, and the scan cannot be split anyway).
CONTEXT_ATTENTION = ('ring', 'dense')


def _value(cfg: Config, key: str) -> Any:
  node: Any = cfg
  for part in key.split('.'):
    node = getattr(node, part)
  return node


def _split_over(logical: str, sizes: dict[str, int],
                dcn: dict[str, int] | None = None) -> tuple[str, int]:
  """('mesh.tensor', 4) or ('mesh.data*fsdp', 4): what a logical name splits
  over; an axis that spans slices reads 'fsdp*dcn_fsdp'."""
  target = LOGICAL_AXIS_RULES.get(logical)
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
  dcn = dcn or {}
  names = [a if dcn.get(a, 1) == 1 else f'{a}*dcn_{a}' for a in axes]
  return 'mesh.' + '*'.join(names), axis_size(sizes, axes)


def _check_splits(cfg: Config, sizes: dict[str, int], dcn: dict[str, int]) -> None:
  """Every split width divisible by the devices it is split over (else init
  would fail deep inside jax with an IndivisibleError); `sizes` are the whole
  mesh's (ICI x DCN)."""
  m = cfg.model
  widths = list(SPLIT_WIDTHS)
  if m.moe.num_experts:
    widths += MOE_SPLIT_WIDTHS
  for key, logical in widths:
    value = _value(cfg, key)
    if key == 'model.moe.expert_dim' and value == 0:
      continue   # 0 = model.mlp_dim, checked above
    where, n = _split_over(logical, sizes, dcn)
    if n > 1 and value % n:
      _fail(key, value, f'must be divisible by {where}={n} ({logical!r} is split over it)')


def _check_context(cfg: Config, sizes: dict[str, int]) -> None:
  """A sequence split over 'context': lengths that split, a kernel that splits."""
  n = sizes['context']
  if cfg.train.seq_len % n:
    _fail('train.seq_len', cfg.train.seq_len, f'must be divisible by mesh.context={n}')
  if n == 1:
    return
  if cfg.mesh.context_layout == 'zigzag' and cfg.train.seq_len % (2 * n):
    _fail('train.seq_len', cfg.train.seq_len,
          f'must be divisible by 2 * mesh.context={2 * n} for '
          "mesh.context_layout='zigzag' (or use 'striped')")
  kind = cfg.model.attention
  if kind == 'infini':
    _fail('model.attention', kind,
          f'mesh.context={n} splits the sequence, but Infini-attention scans its '
          'memory over segments in array order: the scan cannot be split over '
          "'context', and under a permuting mesh.context_layout (now "
          f'{cfg.mesh.context_layout!r}) earlier tokens would read later ones from '
          'the memory; set mesh.context=1 for Infini-attention (split the batch '
          'over data/fsdp instead)')
  if kind not in CONTEXT_ATTENTION:
    _fail('model.attention', kind,
          f'mesh.context={n} splits the sequence, but {kind!r} would all-gather '
          'q/k/v and compute the whole attention on every context shard; set '
          "model.attention=ring (or 'dense', which keeps a [T/N, T] score "
          'matrix per device), or mesh.context=1')


def validate_mesh(cfg: Config, num_devices: int) -> dict[str, int]:
  """The resolved per-slice (ICI) axis sizes, after checking every split that
  the whole mesh (ICI x `dcn_shape`) implies."""
  sizes = resolve_mesh_shape(cfg.mesh, num_devices)
  dcn = dcn_shape(cfg.mesh)
  total = total_shape(sizes, dcn)
  _check_splits(cfg, total, dcn)
  batch_shards = total['data'] * total['fsdp'] * total['expert']
  if cfg.train.batch_size % batch_shards:
    where, _ = _split_over('batch', total, dcn)
    _fail('train.batch_size', cfg.train.batch_size,
          f'must be divisible by the batch shards data*fsdp*expert={batch_shards} '
          f'({where} over the whole mesh)')
  _check_context(cfg, total)
  return sizes
