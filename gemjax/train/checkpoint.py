"""Orbax checkpoints: async saves, keep-last-K, resume, re-mesh, fine-tune.

A checkpoint step directory holds four items:
  state/   the train state {'step', 'params', 'opt_state'} (Orbax PyTree)
  data/    the data iterator state, one JSON per process (Grain's handler)
  config/  the run config as JSON, so eval and fine-tuning can rebuild the model
  meta/    {'format_version': FORMAT_VERSION, 'written_by': ...} (JSON)

`format_version` is the layout of the parameter tree and of these items;
checkpoints from before it existed (no meta/) are version 0, whose layout
version 1 kept. Reading a version this gemjax does not know is an error that
names both versions (`check_format`). `gemjax.convert` writes the same items
(without data/) for imported Hugging Face models.

Restoring takes an *abstract* target whose shardings come from the current
mesh, so a run saved on one mesh restores onto another. Every failure names the
path and what did not match; nothing falls back to a fresh start silently.
Directories may be gs:// URLs: Orbax writes there itself (`gemjax.train.storage`
only checks that a library for the scheme is installed).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain
import grain.checkpoint  # noqa: F401  (registers Grain's Orbax handler)
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from gemjax.errors import CheckpointError
from gemjax.train import storage

log = logging.getLogger(__name__)

# Bump when the parameter tree or the items change incompatibly; list every
# version this code reads in READABLE_VERSIONS.
FORMAT_VERSION = 1
READABLE_VERSIONS = (0, 1)


def format_meta(written_by: str, **extra) -> dict:
  return {'format_version': FORMAT_VERSION, 'written_by': written_by, **extra}


def json_item_file(item_dir: epath.Path) -> epath.Path | None:
  """The JSON file of an Orbax JSON item ('metadata'; Orbax's own
  bookkeeping files beside it start with '_' or are commit markers)."""
  if not item_dir.exists():
    return None
  if (item_dir / 'metadata').exists():
    return item_dir / 'metadata'
  files = sorted(p for p in item_dir.iterdir()
                 if not p.name.startswith('_') and p.name != 'commit_success.txt')
  return files[0] if files else None


def read_meta(step_dir: epath.Path) -> dict:
  """The step's meta item ({} for checkpoints from before it existed)."""
  path = json_item_file(step_dir / 'meta')
  if path is None:
    return {}
  try:
    return json.loads(path.read_text())
  except Exception as e:
    raise CheckpointError(f'checkpoint {step_dir}: unreadable meta item {path}: {e}') from e


def check_format(step_dir: epath.Path) -> dict:
  """Raises CheckpointError unless this gemjax reads the step's format."""
  meta = read_meta(step_dir)
  version = meta.get('format_version', 0)
  if version not in READABLE_VERSIONS:
    newer = isinstance(version, int) and version > FORMAT_VERSION
    raise CheckpointError(
        f'checkpoint {step_dir} has format_version {version!r} (written by '
        f"{meta.get('written_by', 'an unknown writer')}); this gemjax reads versions "
        f'{list(READABLE_VERSIONS)}'
        + ('. Upgrade gemjax to read it.' if newer else
           '. Convert it with the gemjax version that wrote it.'))
  return meta


def _key_name(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def key_of(path) -> str:
  """A tree path as the 'params/layers/blocks/0/attn/wq' key of `flat_params`."""
  return '/'.join(_key_name(k) for k in path)


def flat_params(tree: Any) -> dict[str, Any]:
  """'params/layers/blocks/0/attn/wq' -> leaf; dicts, namedtuples, lists alike."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {key_of(path): leaf for path, leaf in flat}


def check_shapes(saved: Any, expected: Any, where: str) -> None:
  """Raises CheckpointError naming the first missing/extra/mismatched leaf."""
  saved_flat, expected_flat = flat_params(saved), flat_params(expected)
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
                'config': ocp.JsonCheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
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
        config=ocp.args.JsonSave(config),
        meta=ocp.args.JsonSave(format_meta('gemjax.train')))
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
    check_format(self._step_dir(step))
    for item in ('state',) + (('data',) if data_iter is not None else ()):
      if not (self._step_dir(step) / item).exists():
        raise CheckpointError(f'checkpoint {where} is partial: item {item!r} is missing')
    if data_iter is not None:
      check_process_count(self._step_dir(step) / 'data', jax.process_index(),
                          jax.process_count())
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


def check_process_count(data_dir: epath.Path, index: int, count: int) -> None:
  """Each process saved its own data position (process_I-of-N.json): a run
  resumed with another process count has no position for some process."""
  if (data_dir / f'process_{index}-of-{count}.json').exists():
    return
  saved = sorted(p.name for p in data_dir.iterdir() if p.name.startswith('process_'))
  counts = sorted({p.rsplit('-of-', 1)[1].removesuffix('.json') for p in saved
                   if '-of-' in p})
  raise CheckpointError(
      f'checkpoint {data_dir.parent}: the data position was saved by '
      f"{' / '.join(counts) or 'no'} process(es) ({saved[:4]}), and this run has {count}; "
      'resume with the same number of processes, or start a new run directory with '
      'checkpoint.init_from=<this checkpoint> (parameters only)')


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
  check_format(step_dir)
  check_shapes(_saved_params(step_dir), abstract_params, str(step_dir / 'state'))
  return _restore_params(step_dir, abstract_params)


def _restore_params(step_dir: epath.Path, abstract_params: Any) -> Any:
  """The 'params' entry of a step's state, onto `abstract_params`' shapes and
  shardings (the optimizer state is not read)."""
  state_dir = step_dir / 'state'
  target = {'params': abstract_params}
  try:
    out = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=_restore_args(target), partial_restore=True))
  except Exception as e:
    raise CheckpointError(f'restoring params from {state_dir} failed: {e}') from e
  return out['params']


# Parameters whose leading dimension after the layers is the vocabulary:
# fine-tuning may append rows (gemjax's special tokens, image codes).
VOCAB_AXES = {'embedding_VxD': 0, 'head_DxV': 1}


def vocab_axis(key: str) -> int | None:
  return VOCAB_AXES.get(key.split('/')[-1])


def loaded_extent(path: str, abstract_params: Any) -> dict[str, int]:
  """{flat key: how much of the parameter `path` provides}: the full size of
  dim 0 for a parameter it has, the rows it has along the vocabulary axis for
  a grown vocabulary, 0 for a parameter it lacks (a new patch embedder).
  Checks the same things `load_params(..., fresh=...)` does."""
  step_dir = resolve_step_dir(path)
  check_format(step_dir)
  saved = _saved_params(step_dir)
  out = {}
  for key, exp in flat_params(abstract_params).items():
    got = saved.get(key)
    if got is None:
      out[key] = 0
    elif tuple(got.shape) == tuple(exp.shape):
      axis = vocab_axis(key)
      out[key] = exp.shape[axis if axis is not None else 0]
    else:
      out[key] = got.shape[_grown_axis(key, got.shape, exp.shape, str(step_dir))]
  extra = sorted(set(saved) - set(out))
  if extra:
    raise CheckpointError(f'checkpoint {step_dir} has parameters this model lacks: '
                          f'{extra[:5]} (a different model config?)')
  return out


def _grown_axis(key: str, saved: tuple, expected: tuple, where: str) -> int:
  axis = vocab_axis(key)
  ok = (axis is not None and len(saved) == len(expected) and saved[axis] < expected[axis]
        and all(s == e for i, (s, e) in enumerate(zip(saved, expected)) if i != axis))
  if not ok:
    raise CheckpointError(
        f'checkpoint {where}: parameter {key} has shape {tuple(saved)} but the model '
        f'expects {tuple(expected)}; only the vocabulary may grow when fine-tuning '
        f'(model.vocab_size above the checkpoint\'s)')
  return axis


def _saved_params(step_dir: epath.Path) -> dict[str, Any]:
  state_dir = step_dir / 'state'
  try:
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
  except Exception as e:
    raise CheckpointError(f'checkpoint {state_dir} is unreadable: {e}') from e
  tree = _tree_of(getattr(meta, 'item_metadata', meta))
  if not isinstance(tree, dict) or 'params' not in tree:
    raise CheckpointError(f'checkpoint {state_dir} has no params entry')
  return flat_params(tree['params'])


def load_params_partial(path: str, fresh: Any) -> Any:
  """Fine-tuning a larger model from `path`: parameters the checkpoint lacks
  keep their values in `fresh` (a freshly initialised model: new patch
  embedders), vocabulary rows beyond the checkpoint's are the mean of the
  loaded rows plus their fresh (random) values, everything else is loaded.
  Any other mismatch is an error naming the parameter."""
  step_dir = resolve_step_dir(path)
  extent = loaded_extent(path, fresh)
  saved = _saved_params(step_dir)
  fresh_flat = flat_params(fresh)
  # Restore what the checkpoint has, each leaf at its saved shape, replicated
  # on the fresh leaf's devices (a grown table cannot keep its sharding).
  target = {}
  for key, leaf in fresh_flat.items():
    if extent[key] == 0:
      continue
    shape = tuple(saved[key].shape)
    sharding = (leaf.sharding if shape == leaf.shape else
                jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
                if isinstance(leaf.sharding, jax.sharding.NamedSharding) else leaf.sharding)
    target[key] = jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)
  loaded = flat_params(_restore_params(step_dir, _select(fresh, target)))
  merged = {}
  for key, leaf in fresh_flat.items():
    if extent[key] == 0:
      merged[key] = leaf
    elif loaded[key].shape == leaf.shape:
      merged[key] = loaded[key]
    else:
      merged[key] = _grow(loaded[key], leaf, vocab_axis(key))
  return unflatten_like(fresh, merged)


def _grow(old: jax.Array, fresh: jax.Array, axis: int) -> jax.Array:
  n = old.shape[axis]

  @jax.jit
  def grow(old, fresh):
    mean = jnp.mean(old.astype(jnp.float32), axis=axis, keepdims=True)
    tail = jax.lax.slice_in_dim(fresh, n, fresh.shape[axis], axis=axis)
    new = (mean + tail.astype(jnp.float32)).astype(fresh.dtype)
    return jnp.concatenate([old.astype(fresh.dtype), new], axis=axis)

  return jax.device_put(grow(old, fresh), fresh.sharding)


def _select(tree: Any, flat: dict[str, Any], prefix: str = '') -> Any:
  """`tree`'s nested dicts (keys as they are, ints included) holding only the
  leaves named in `flat`, with `flat`'s values; None when nothing is left."""
  if not isinstance(tree, dict):
    return flat.get(prefix[:-1])
  out = {}
  for k, v in tree.items():
    sub = _select(v, flat, f'{prefix}{k}/')
    if sub is not None:
      out[k] = sub
  return out or None


def unflatten_like(like: Any, flat: dict[str, Any]) -> Any:
  """`flat_params`' inverse: `like`'s structure with the leaves of `flat`."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  keys = [key_of(p) for p, _ in paths]
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def load_config_dict(path: str) -> dict:
  """The config saved next to a checkpoint (run dir or step dir)."""
  step_dir = resolve_step_dir(path)
  path = json_item_file(step_dir / 'config')
  if path is None:
    raise CheckpointError(f'checkpoint {step_dir} has no saved config')
  return json.loads(path.read_text())
