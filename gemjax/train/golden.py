"""Golden sharding files: the PartitionSpec of every parameter and batch key.

For each preset in `PRESETS`, `render(preset_path)` lists every parameter
(`params/...`) and every batch key (`batch/...`) with its global shape and the
PartitionSpec it gets on the preset's intended mesh, one sorted line each:

    params/layers/blocks/0/attn/wq_DxHxK  (32, 8192, 64, 128)  P(None, 'fsdp', None, None)

`tests/test_golden_sharding.py` compares the text with
`tests/golden/sharding/<preset>.txt`, so a refactor that renames a parameter
or moves it to another mesh axis shows up as a diff in review. When the change
is intended, rewrite the files:

    python -m gemjax.train.golden --update

The mesh is a `jax.sharding.AbstractMesh` (nothing is allocated; the ultra
model evaluates in seconds). A preset whose mesh has a -1 axis is taken on
`FILL_DEVICES` devices (the 8-device CPU mesh the sharded tests use).

It records parallel/'s facts but needs the model (`train.state.model_def`),
so it lives on the top floor with the other rooms that compose the model and
the mesh. Nothing in gemjax imports it.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import jax

from gemjax import batch as batch_lib
from gemjax import config as config_lib
from gemjax.parallel import axes
from gemjax.parallel import mesh as mesh_lib
from gemjax.parallel import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = ('nano', 'nano-moe', 'pro', 'ultra', 'nano-tensor-context')
# Golden entries that are a preset on another mesh: every preset has tensor = 1
# and context = 1, and size-1 axes drop out of every spec, so without this one
# the rules for heads, mlp, vocab and length would go unrecorded.
VARIANTS = {
    'nano-tensor-context': ('nano', ['mesh.data=1', 'mesh.fsdp=2', 'mesh.tensor=2',
                                     'mesh.context=2']),
}
GOLDEN_DIR = os.path.join(ROOT, 'tests', 'golden', 'sharding')
UPDATE_COMMAND = 'python -m gemjax.train.golden --update'
FILL_DEVICES = 8

def preset_path(name: str) -> str:
  return os.path.join(ROOT, 'configs', f'{name}.yaml')


def golden_path(name: str) -> str:
  return os.path.join(GOLDEN_DIR, f'{name}.txt')


def intended_mesh(cfg: config_lib.Config) -> jax.sharding.AbstractMesh:
  """The preset's mesh, abstract; a -1 axis fills `FILL_DEVICES` devices."""
  sizes = {a: getattr(cfg.mesh, a) for a in axes.MESH_AXES}
  dcn = mesh_lib.dcn_shape(cfg.mesh)
  if -1 in sizes.values():
    num_devices = FILL_DEVICES
  else:
    num_devices = math.prod(sizes.values()) * math.prod(dcn.values())
  sizes = mesh_lib.total_shape(mesh_lib.resolve_mesh_shape(cfg.mesh, num_devices), dcn)
  return jax.sharding.AbstractMesh(
      tuple(sizes[a] for a in axes.MESH_AXES), axes.MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(axes.MESH_AXES))


def batch_entries(cfg: config_lib.Config) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """key -> (global shape, logical axes) for the preset's training batch."""
  B, T = cfg.train.batch_size, cfg.train.seq_len
  out = {}
  for key in batch_lib.REQUIRED_KEYS:
    out[key] = ((B, T, 3) if key == 'positions' else (B, T), batch_lib.logical_axes(key))
  dims = batch_lib.patch_dims(cfg.model)
  for m, budget in batch_lib.patch_budgets(cfg.data).items():
    pk, sk = batch_lib.patch_keys(m)
    out[pk] = ((B, budget, dims.get(m, 0)), batch_lib.logical_axes(pk))
    out[sk] = ((B, budget), batch_lib.logical_axes(sk))
  return out


def _key_name(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _fmt_spec(spec: jax.sharding.PartitionSpec) -> str:
  return 'P(' + ', '.join(repr(e) for e in spec) + ')'


def render_config(cfg: config_lib.Config) -> str:
  from gemjax.train import state as state_lib   # the model: heavy, only here
  mesh = intended_mesh(cfg)
  mdef = state_lib.model_def(cfg.model)
  names = dict(jax.tree_util.tree_leaves_with_path(mdef.logical_axes,
                                                   is_leaf=state_lib._is_axes))
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(mdef.abstract_params):
    spec = shd.logical_to_spec(names[path], mesh)
    rows.append(('params/' + '/'.join(_key_name(k) for k in path), tuple(leaf.shape), spec))
  for key, (shape, logical) in batch_entries(cfg).items():
    rows.append((f'batch/{key}', shape, shd.logical_to_spec(logical, mesh)))
  rows.sort()
  mesh_line = ', '.join(f'{a}={n}' for a, n in mesh.shape.items())
  lines = [f'# mesh: {mesh_line}']
  # Not column-aligned: a new long name must not reflow every other line.
  lines += [f'{name}  {shape}  {_fmt_spec(spec)}' for name, shape, spec in rows]
  return '\n'.join(lines) + '\n'


def render(preset: str) -> str:
  """The golden text of a preset (a path to its YAML, or a name in PRESETS)."""
  if preset in VARIANTS:
    base, overrides = VARIANTS[preset]
    return render_config(config_lib.load_config(preset_path(base), overrides))
  path = preset if preset.endswith('.yaml') else preset_path(preset)
  return render_config(config_lib.load_config(path))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  update = '--update' in argv
  names = [a for a in argv if not a.startswith('--')] or list(PRESETS)
  stale = []
  for name in names:
    text = render(name)
    path = golden_path(name)
    old = open(path).read() if os.path.exists(path) else None
    if old == text:
      continue
    stale.append(name)
    if update:
      os.makedirs(GOLDEN_DIR, exist_ok=True)
      with open(path, 'w') as f:
        f.write(text)
      print(f'wrote {os.path.relpath(path, ROOT)}')
  if stale and not update:
    print(f'out of date: {", ".join(stale)}; run `{UPDATE_COMMAND}` if the change is intended')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
