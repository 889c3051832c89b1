"""Train state, optimizer and the jitted train/eval steps with explicit shardings.

The train state is a plain dict `{'step', 'params', 'opt_state'}` of arrays,
with `params` the model's pure-dict state (what Orbax saves). The model
structure (NNX graphdef) stays outside the state and is merged inside the
step, so the same state restores onto any mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gemjax.model.decoder import Decoder, flatten_aux
from gemjax.model.loss import cross_entropy
from gemjax.parallel import sharding as shd


@dataclasses.dataclass
class ModelDef:
  """What the step needs besides the state: structure and abstract shapes."""
  graphdef: Any
  abstract_params: Any      # pure dict of ShapeDtypeStruct
  logical_axes: Any         # pure dict of tuples of logical names


def model_def(model_cfg) -> ModelDef:
  abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  params = nnx.to_pure_dict(state)
  axes_state = jax.tree.map(lambda v: v.get_metadata().get('out_sharding'), state,
                            is_leaf=lambda x: isinstance(x, nnx.Variable))
  axes = _to_pure(axes_state)
  return ModelDef(graphdef, params, axes)


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


NO_DECAY_NAMES = ('scale', 'memory_gate')


def _decay_mask(params) -> Any:
  """Weight decay on matrices only: not on norm scales or gates, whose names
  decide (a scale stacked over scanned layers is 2-D but still a scale)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and _leaf_name(path) not in NO_DECAY_NAMES, params)


def _leaf_name(path) -> str:
  return str(getattr(path[-1], 'key', path[-1])) if path else ''


def _scale_by_name(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of parameters named in `multipliers` (own LR)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * multipliers.get(_leaf_name(path), 1.0), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt_cfg, total_steps: int,
                   lr_multipliers: dict[str, float] | None = None,
                   frozen_prefixes: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """AdamW with clipping. `lr_multipliers`: parameter name -> LR multiplier for
  parameter groups such as Infini-attention's gate (`infini.lr_multipliers`);
  those parameters get no weight decay."""
  mults = dict(lr_multipliers or {})

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, m: m and _leaf_name(path) not in mults, _decay_mask(params))

  chain = [optax.clip_by_global_norm(opt_cfg.clip_norm),
           optax.adamw(lr_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                       eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=mask)]
  if mults:
    chain.append(_scale_by_name(mults))
  if frozen_prefixes:
    # Frozen parameters get a zero update (weight decay included).
    def frozen(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: '/'.join(str(getattr(k, 'key', k)) for k in path).startswith(
              frozen_prefixes), params)
    chain.append(optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*chain)


def optimizer_for(cfg) -> optax.GradientTransformation:
  """The run's optimizer: AdamW + the model's parameter groups."""
  m = cfg.model
  from gemjax.model import infini  # the gate's own LR, no weight decay
  mults = infini.lr_multipliers(m)
  frozen = ('inputs/encoders',) if m.freeze_encoder and m.encoder_layers > 0 else ()
  return make_optimizer(cfg.optimizer, cfg.train.steps, lr_multipliers=mults,
                        frozen_prefixes=frozen)


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

  def init():
    model = Decoder(model_cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params)}

  with shd.use_mesh(mesh):
    return jax.jit(init, out_shardings=shards)()


# -------------------------------------------------------------------- steps


def loss_fn(params, batch, *, graphdef, z_loss: float):
  model = nnx.merge(graphdef, params)
  logits, aux = model(batch)
  loss, metrics = cross_entropy(logits, batch, z_loss=z_loss)
  aux = flatten_aux(aux)
  aux_loss = sum((jnp.sum(v) for k, v in aux.items() if k.split('/')[0].endswith('_loss')),
                 jnp.zeros((), jnp.float32))
  metrics['aux_loss'] = aux_loss
  metrics.update({f'aux/{k}': v for k, v in aux.items()})
  return loss + aux_loss, metrics


def make_train_step(mdef: ModelDef, tx, model_cfg, schedule: Callable) -> Callable:
  """One optimizer step; a non-finite loss or gradient leaves the state as is."""

  def step_fn(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state['params'], batch, graphdef=mdef.graphdef,
                                     z_loss=model_cfg.z_loss)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state['opt_state'], state['params'])
    new_params = optax.apply_updates(state['params'], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {'step': state['step'] + 1,
                 'params': keep(new_params, state['params']),
                 'opt_state': keep(new_opt, state['opt_state'])}
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite,
                   learning_rate=schedule(state['step']))
    return new_state, metrics

  return step_fn


def make_eval_step(mdef: ModelDef, model_cfg) -> Callable:
  def eval_fn(params, batch):
    _, metrics = loss_fn(params, batch, graphdef=mdef.graphdef, z_loss=model_cfg.z_loss)
    return metrics
  return eval_fn


def batch_shardings(mesh, batch_spec: dict) -> dict:
  """Per-key shardings: per-token arrays split over batch and length."""
  out = {}
  for key, ndim in batch_spec.items():
    if key.endswith('_patches') or key.endswith('_slots'):
      names = ('batch',) + (None,) * (ndim - 1)
    else:
      names = ('batch', 'length') + (None,) * (ndim - 2)
    out[key] = shd.named_sharding(mesh, names)
  return out


def jit_train_step(step_fn, state_shards, batch_shards):
  return jax.jit(step_fn, in_shardings=(state_shards, batch_shards),
                 out_shardings=(state_shards, None), donate_argnums=(0,))


def to_global(batch: dict, shards: dict) -> dict:
  """Process-local numpy rows -> global jax.Arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(shards[k], v) for k, v in batch.items()}
