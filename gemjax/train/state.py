"""Train state, optimizer and the jitted train/eval steps with explicit shardings.

The train state is a plain dict `{'step', 'params', 'opt_state'}` of arrays,
with `params` the model's pure-dict state (what Orbax saves). The model
structure (NNX graphdef) stays outside the state and is merged inside the
step, so the same state restores onto any mesh.

The optimizer's parameter groups (no weight decay, own learning rate,
frozen) come from the parameters' NNX metadata (`gemjax.model.params`): this
room never names a model path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gemjax import batch as batch_lib
from gemjax.model import params as params_lib
from gemjax.model.decoder import flatten_aux
from gemjax.model.loss import chunked_cross_entropy, cross_entropy
from gemjax.model.spec import decoder_spec
from gemjax.parallel import sharding as shd
from gemjax.train import checkpoint as ckpt_lib


@dataclasses.dataclass
class ParamGroups:
  """Per-parameter optimizer settings, pure dicts shaped like the params."""
  weight_decay: Any         # bool: decayed
  lr_mult: Any              # float: learning-rate multiplier (1.0 = none)
  own_lr: Any               # bool: the parameter declares an lr_mult
  frozen: Any               # bool: no update at all


@dataclasses.dataclass
class ModelDef:
  """What the step needs besides the state: structure and abstract shapes."""
  graphdef: Any
  abstract_params: Any      # pure dict of ShapeDtypeStruct
  logical_axes: Any         # pure dict of tuples of logical names
  groups: ParamGroups       # optimizer parameter groups from the metadata
  spec: Any = None          # the DecoderSpec it was built from (FLOPs)


def _metadata(state, fn) -> Any:
  return _to_pure(jax.tree.map(lambda v: fn(v.get_metadata()), state,
                               is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_groups(state) -> ParamGroups:
  """Reads the parameter groups off an nnx.State's variable metadata."""
  frozen = _metadata(state, lambda m: bool(m.get(params_lib.FROZEN, False)))
  return ParamGroups(
      weight_decay=_metadata(state, lambda m: bool(m.get(params_lib.WEIGHT_DECAY, True))),
      lr_mult=_metadata(state, lambda m: float(m.get(params_lib.LR_MULT, 1.0))),
      own_lr=_metadata(state, lambda m: params_lib.LR_MULT in m),
      frozen=frozen)


def model_def(model_cfg) -> ModelDef:
  spec = decoder_spec(model_cfg)
  abstract = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  params = nnx.to_pure_dict(state)
  axes = _metadata(state, lambda m: m.get('out_sharding'))
  return ModelDef(graphdef, params, axes, param_groups(state), spec)


def _to_pure(state) -> Any:
  """nnx.State whose leaves are metadata tuples -> nested dict (tuples kept)."""
  out = {}
  for path, value in nnx.to_flat_state(state):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.get_value() if isinstance(value, nnx.Variable) else value
  return out


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def param_shardings(mdef: ModelDef, mesh) -> Any:
  return jax.tree.map(lambda names: shd.named_sharding(mesh, names), mdef.logical_axes,
                      is_leaf=_is_axes)


def param_count(mdef: ModelDef) -> int:
  return sum(x.size for x in jax.tree.leaves(mdef.abstract_params))


# ---------------------------------------------------------------- optimizer


def lr_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  decay = opt_cfg.decay_steps or total_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.learning_rate,
      warmup_steps=opt_cfg.warmup_steps,
      decay_steps=max(decay, opt_cfg.warmup_steps + 1),
      end_value=opt_cfg.learning_rate * opt_cfg.min_lr_ratio)


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its multiplier (its own LR)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt_cfg, total_steps: int, groups: ParamGroups) -> optax.GradientTransformation:
  """AdamW with clipping over the model's parameter groups.

  Weight decay only where `groups.weight_decay` (not on norm scales or gates,
  stacked over scanned layers or not); parameters that declare an `lr_mult`
  get their updates scaled by it and no weight decay; frozen parameters get a
  zero update (weight decay included).
  """
  decay = jax.tree.map(lambda d, own: d and not own, groups.weight_decay, groups.own_lr)
  chain = [optax.clip_by_global_norm(opt_cfg.clip_norm),
           optax.adamw(lr_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                       eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=decay)]
  if any(jax.tree.leaves(groups.own_lr)):
    chain.append(_scale_by_tree(groups.lr_mult))
  if any(jax.tree.leaves(groups.frozen)):
    chain.append(optax.masked(optax.set_to_zero(), groups.frozen))
  return optax.chain(*chain)


def optimizer_for(cfg, mdef: ModelDef | None = None,
                  loaded: dict[str, int] | None = None) -> optax.GradientTransformation:
  """The run's optimizer: AdamW + the model's parameter groups (+ the
  fine-tuning freeze of what `checkpoint.init_from` provided, `loaded` being
  `checkpoint.loaded_extent`'s answer)."""
  mdef = model_def(cfg.model) if mdef is None else mdef
  tx = make_optimizer(cfg.optimizer, cfg.train.steps, mdef.groups)
  steps = cfg.checkpoint.freeze_loaded_steps
  if steps and loaded is not None:
    tx = optax.chain(tx, freeze_loaded(loaded, steps))
  return tx


class FreezeState(NamedTuple):
  count: jax.Array


def freeze_loaded(loaded: dict[str, int], steps: int) -> optax.GradientTransformation:
  """Zero updates, for the first `steps` steps, on what a fine-tuning run
  loaded: `loaded[key]` leading entries (vocabulary rows for the embedding
  and head, the whole parameter otherwise; 0 = a new parameter, trained).
  Counts its own steps, so a resumed run keeps the schedule."""
  def init(params):
    del params
    return FreezeState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    frozen_now = state.count < steps

    def mask(path, u):
      key = ckpt_lib.key_of(path)
      n = loaded.get(key, 0)
      if n == 0:
        return u
      axis = ckpt_lib.vocab_axis(key) or 0
      idx = jax.lax.broadcasted_iota(jnp.int32, u.shape, axis)
      return jnp.where(frozen_now & (idx < n), jnp.zeros_like(u), u)

    return (jax.tree_util.tree_map_with_path(mask, updates),
            FreezeState(state.count + 1))

  return optax.GradientTransformation(init, update)


def state_shardings(mdef: ModelDef, tx, mesh) -> dict:
  pshard = param_shardings(mdef, mesh)
  abs_opt = jax.eval_shape(tx.init, mdef.abstract_params)
  replicated = NamedSharding(mesh, P())
  opt_shard = optax.tree_map_params(
      tx, lambda _, s: s, abs_opt, pshard,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return {'step': replicated, 'params': pshard, 'opt_state': opt_shard}


def abstract_state(mdef: ModelDef, tx, mesh) -> dict:
  """ShapeDtypeStructs with shardings: the restore target for Orbax."""
  shards = state_shardings(mdef, tx, mesh)
  abs_state = {'step': jax.ShapeDtypeStruct((), jnp.int32),
               'params': mdef.abstract_params,
               'opt_state': jax.eval_shape(tx.init, mdef.abstract_params)}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abs_state, shards)


def init_state(model_cfg, mdef: ModelDef, tx, mesh, seed: int) -> dict:
  """Initialises parameters directly in their sharded layout (never gathered)."""
  shards = state_shardings(mdef, tx, mesh)
  spec = decoder_spec(model_cfg)

  def init():
    model = spec.build(nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params)}

  with shd.use_mesh(mesh):
    return jax.jit(init, out_shardings=shards)()


# -------------------------------------------------------------------- steps


def loss_fn(params, batch, *, graphdef, z_loss: float, loss_chunk: int = 0):
  model = nnx.merge(graphdef, params)
  if loss_chunk:
    info = model.sequence_info(batch)
    x, aux, _ = model.run_layers(model.embed(batch, info), info)
    loss, metrics = chunked_cross_entropy(model.logits, x, batch, z_loss=z_loss,
                                          chunk=loss_chunk)
  else:
    logits, aux, _ = model(batch)
    loss, metrics = cross_entropy(logits, batch, z_loss=z_loss)
  aux = flatten_aux(aux)
  aux_loss = sum((jnp.sum(v) for k, v in aux.items() if k.split('/')[0].endswith('_loss')),
                 jnp.zeros((), jnp.float32))
  metrics['aux_loss'] = aux_loss
  metrics.update({f'aux/{k}': v for k, v in aux.items()})
  return loss + aux_loss, metrics


def count_tokens(batch) -> jax.Array:
  """Real (non-padding, segment id > 0) tokens of a batch, float32 so window
  sums accumulate with the other float metrics; what tokens/s reports."""
  return jnp.sum(batch['segment_ids'] > 0, dtype=jnp.float32)


def make_train_step(mdef: ModelDef, tx, model_cfg, schedule: Callable) -> Callable:
  """One optimizer step; a non-finite loss or gradient leaves the state as is."""

  def step_fn(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state['params'], batch, graphdef=mdef.graphdef,
                                     z_loss=model_cfg.z_loss, loss_chunk=model_cfg.loss_chunk)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state['opt_state'], state['params'])
    new_params = optax.apply_updates(state['params'], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {'step': state['step'] + 1,
                 'params': keep(new_params, state['params']),
                 'opt_state': keep(new_opt, state['opt_state'])}
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite,
                   learning_rate=schedule(state['step']),
                   tokens_sum=count_tokens(batch))
    return new_state, metrics

  return step_fn


def make_eval_step(mdef: ModelDef, model_cfg) -> Callable:
  def eval_fn(params, batch):
    _, metrics = loss_fn(params, batch, graphdef=mdef.graphdef, z_loss=model_cfg.z_loss,
                         loss_chunk=model_cfg.loss_chunk)
    return metrics
  return eval_fn


def batch_shardings(mesh, batch_spec: dict) -> dict:
  """Per-key shardings from the logical axes of the batch contract.

  `batch_spec`: key -> ndim of the batch's arrays; the ndim is checked
  against `gemjax.batch.KEYS`, and a key the contract lacks is an error.
  """
  out = {}
  for key, ndim in batch_spec.items():
    names = batch_lib.logical_axes(key)
    if ndim != len(names):
      raise ValueError(f'batch key {key!r} has {ndim} dimensions; the batch '
                       f'contract says {len(names)} {names}')
    out[key] = shd.named_sharding(mesh, names)
  return out


def jit_train_step(step_fn, state_shards, batch_shards):
  return jax.jit(step_fn, in_shardings=(state_shards, batch_shards),
                 out_shardings=(state_shards, None), donate_argnums=(0,))


def to_global(batch: dict, shards: dict) -> dict:
  """Process-local numpy rows -> global jax.Arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(shards[k], v) for k, v in batch.items()}
