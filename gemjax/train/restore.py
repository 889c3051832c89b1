"""A trained model back from its run: the saved config and the parameters.

`resolve_config(path, overrides)` takes the config saved with a checkpoint
(the model must be the one that was trained) and puts the user's YAML and
command-line overrides for eval/mesh/data on top; `load_for_eval(cfg)` builds
the mesh and restores the parameters of `cfg.eval.checkpoint` onto it.
Shared by eval.py and generate.py. Imports config, train's checkpoint and state.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
from omegaconf import OmegaConf

from gemjax import config as config_lib
from gemjax.train import checkpoint as ckpt_lib
from gemjax.train import state as state_lib
from gemjax.train.loop import build_mesh

log = logging.getLogger('gemjax')


def resolve_config(path: str | None, overrides: Sequence[str]) -> config_lib.Config:
  """The checkpoint's own config, with the user's YAML/overrides on top."""
  cfg = config_lib.load_config(path, overrides)
  ckpt = cfg.eval.checkpoint or cfg.train.run_dir
  saved = _known_only(ckpt_lib.load_config_dict(ckpt), config_lib.Config(), ckpt)
  merged = OmegaConf.merge(OmegaConf.structured(config_lib.Config),
                           OmegaConf.create(saved))
  # The model must be the one that was trained; eval/data/mesh may change.
  user = OmegaConf.structured(cfg)
  for section in ('eval', 'mesh', 'data'):
    if _touched(path, overrides, section):
      merged[section] = user[section]
  merged.eval.checkpoint = ckpt
  out = OmegaConf.to_object(merged)
  config_lib.validate(out)
  return out


def _known_only(saved: dict, template, where: str, prefix: str = '') -> dict:
  """Drops keys an older gemjax saved that this version no longer has."""
  import dataclasses
  out = {}
  for k, v in saved.items():
    if not hasattr(template, k):
      log.warning('%s: ignoring saved config key %s%s (unknown to this version)',
                  where, prefix, k)
      continue
    sub = getattr(template, k)
    out[k] = _known_only(v, sub, where, f'{prefix}{k}.') if dataclasses.is_dataclass(sub) \
        and isinstance(v, dict) else v
  return out


def _touched(path, overrides, section) -> bool:
  if any(o.startswith(section + '.') for o in overrides):
    return True
  if path:
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    return section in raw
  return False


def load_for_eval(cfg: config_lib.Config):
  """(params, mdef, mesh) of the checkpoint named by cfg.eval.checkpoint."""
  mesh = build_mesh(cfg)
  mdef = state_lib.model_def(cfg.model)
  shards = state_lib.param_shardings(mdef, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          mdef.abstract_params, shards)
  return ckpt_lib.load_params(cfg.eval.checkpoint, abstract), mdef, mesh
