"""Orbax checkpoints: async saves, keep-last-K, resume, re-mesh, fine-tune.

A checkpoint step directory holds three items:
  state/   the train state {'step', 'params', 'opt_state'} (Orbax PyTree)
  data/    the data iterator state, one JSON per process (Grain's handler)
  config/  the run config as JSON, so eval and fine-tuning can rebuild the model

Restoring takes an *abstract* target whose shardings come from the current
mesh, so a run saved on one mesh restores onto another. Every failure names the
path and what did not match; nothing falls back to a fresh start silently.
Directories may be gs:// URLs: Orbax writes there itself (`gemjax.train.storage`
only checks that a library for the scheme is installed).
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import grain.checkpoint  # noqa: F401  (registers Grain's Orbax handler)
import jax
import orbax.checkpoint as ocp
from etils import epath

from gemjax.errors import CheckpointError
from gemjax.train import storage

log = logging.getLogger(__name__)


def _key_name(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree: Any) -> dict[str, Any]:
  """'params/layers/blocks/0/attn/wq' -> leaf; dicts, namedtuples, lists alike."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in flat}


def check_shapes(saved: Any, expected: Any, where: str) -> None:
  """Raises CheckpointError naming the first missing/extra/mismatched leaf."""
  saved_flat, expected_flat = _flat(saved), _flat(expected)
  missing = sorted(set(expected_flat) - set(saved_flat))
  extra = sorted(set(saved_flat) - set(expected_flat))
  if missing or extra:
    raise CheckpointError(
        f'checkpoint {where} does not match the model: '
        + (f'missing {missing[:5]}' if missing else '')
        + (' ' if missing and extra else '')
        + (f'unexpected {extra[:5]}' if extra else '')
        + ' (a different model config?)')
  for key, exp in expected_flat.items():
    got = saved_flat[key]
    if tuple(getattr(got, 'shape', ())) != tuple(exp.shape):
      raise CheckpointError(
          f'checkpoint {where}: parameter {key} has shape {tuple(got.shape)} '
          f'in the checkpoint but the model expects {tuple(exp.shape)}')


def _partial_dirs(directory: epath.Path) -> list[str]:
  if not directory.exists():
    return []
  return sorted(p.name for p in directory.iterdir() if 'tmp' in p.name)


class Checkpointer:
  """The run's CheckpointManager plus the checks and errors around it."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    # gs://... goes to Orbax as a URL (never a local folder named 'gs:').
    self.directory = storage.run_path(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    handlers = {'state': ocp.PyTreeCheckpointHandler(),
                'data': grain.checkpoint.CheckpointHandler(),
                'config': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

  # ------------------------------------------------------------------ save

  def save(self, step: int, state: Any, data_iter: Any, config: dict, *,
           force: bool = False) -> bool:
    # The interval is decided here (Orbax's default policy also saves the
    # first step it sees, which would make resumes depend on the start step).
    if (not force and step % self.every) or step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  # --------------------------------------------------------------- restore

  def latest_step(self) -> int | None:
    """Newest complete step; an error if only partial checkpoints exist."""
    self.manager.reload()
    step = self.manager.latest_step()
    if step is None:
      partial = _partial_dirs(self.directory)
      if partial:
        raise CheckpointError(
            f'{self.directory} holds only partial (unfinished) checkpoints '
            f'{partial}; remove them or set checkpoint.resume=false to start over')
    return step

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    """Restores state (onto the shardings in `abstract_state`) and the iterator."""
    where = str(self._step_dir(step))
    for item in ('state',) + (('data',) if data_iter is not None else ()):
      if not (self._step_dir(step) / item).exists():
        raise CheckpointError(f'checkpoint {where} is partial: item {item!r} is missing')
    try:
      meta = self.manager.item_metadata(step)['state']
    except Exception as e:
      raise CheckpointError(f'checkpoint {where} is unreadable: {e}') from e
    if meta is None:
      raise CheckpointError(f'checkpoint {where} has no readable state metadata')
    check_shapes(_tree_of(meta), abstract_state, where)
    args = {'state': ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=_restore_args(abstract_state))}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
      raise CheckpointError(f'restoring {where} failed: {type(e).__name__}: {e}') from e
    return restored['state']

  def saved_config(self, step: int) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))['config']
    except Exception as e:
      raise CheckpointError(f'checkpoint {self._step_dir(step)} has no readable '
                            f'config: {e}') from e


def _tree_of(meta: Any) -> Any:
  tree = getattr(meta, 'tree', meta)
  return tree


def _restore_args(abstract: Any) -> Any:
  return jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                     dtype=a.dtype), abstract)


def resolve_step_dir(path: str) -> epath.Path:
  """`path` is a run directory (newest step is taken) or one step directory."""
  p = storage.run_path(path)
  if not p.exists():
    raise CheckpointError(f'checkpoint path {path!r} does not exist')
  if (p / 'state').exists():
    return p
  steps = sorted((int(c.name) for c in p.iterdir() if c.name.isdigit()
                  and (c / 'state').exists()), reverse=True)
  if not steps:
    partial = _partial_dirs(p)
    raise CheckpointError(f'{path!r} contains no complete checkpoint'
                          + (f' (only partial ones: {partial})' if partial else ''))
  return p / str(steps[0])


def load_params(path: str, abstract_params: Any) -> Any:
  """Parameters only, from a run dir or step dir, onto the given shardings."""
  step_dir = resolve_step_dir(path)
  state_dir = step_dir / 'state'
  ckptr = ocp.PyTreeCheckpointer()
  try:
    meta = ckptr.metadata(state_dir)
  except Exception as e:
    raise CheckpointError(f'checkpoint {state_dir} is unreadable: {e}') from e
  tree = _tree_of(getattr(meta, 'item_metadata', meta))
  if not isinstance(tree, dict) or 'params' not in tree:
    raise CheckpointError(f'checkpoint {state_dir} has no params entry')
  check_shapes(tree['params'], abstract_params, str(state_dir))
  target = {'params': abstract_params}
  try:
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=_restore_args(target), partial_restore=True))
  except Exception as e:
    raise CheckpointError(f'restoring params from {state_dir} failed: {e}') from e
  return out['params']


def load_config_dict(path: str) -> dict:
  """The config saved next to a checkpoint (run dir or step dir)."""
  import json
  step_dir = resolve_step_dir(path)
  cfg_dir = step_dir / 'config'
  files = list(cfg_dir.iterdir()) if cfg_dir.exists() else []
  if not files:
    raise CheckpointError(f'checkpoint {step_dir} has no saved config')
  return json.loads(files[0].read_text())
