"""How gemjax creates parameters: logical axis names and parameter groups.

A parameter carries two kinds of NNX variable metadata:

  out_sharding   its *logical* axis names ('embed', 'heads', ...); only
                 `gemjax.parallel.sharding` maps them to mesh axes.
  weight_decay   False for parameters the optimizer must not decay (norm
                 scales, gates); absent means True.
  lr_mult        a learning-rate multiplier (Infini-attention's gate).
  frozen         True for parameters that get no update (a frozen encoder).

The optimizer reads the groups from the metadata (`train.state.param_groups`),
so no code above the model names a parameter path. Also the one projection
helper every sublayer uses. Imports jax and flax.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

WEIGHT_DECAY, LR_MULT, FROZEN = 'weight_decay', 'lr_mult', 'frozen'

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype(name: str) -> Any:
  """A dtype by config name ('float32' | 'bfloat16' | 'float16')."""
  return DTYPES[name]


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], *,
          std: float, dtype=jnp.float32, **groups) -> nnx.Param:
  """A normally initialised parameter tagged with logical axis names (+ groups)."""
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False,
                   **groups)


def constant(value: jax.Array, names: Sequence[str | None], **groups) -> nnx.Param:
  """A parameter with a given initial value (zeros for scales, gates, tables)."""
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, **groups)


def freeze(module: nnx.Module) -> None:
  """Marks every parameter of `module` frozen (no update, no weight decay)."""
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      var.set_metadata(FROZEN, True)


def fan_in_std(fan_in: int) -> float:
  return 1.0 / math.sqrt(fan_in)


def project(x: jax.Array, w: jax.Array, n_in: int = 1, *, dtype=None) -> jax.Array:
  """Contract the last `n_in` dims of `x` with the first `n_in` dims of `w`.

  Written as one 2-D matmul over flattened tokens, [N, in] @ [in, out]: the
  same math as the einsum, but XLA:CPU runs the backward pass of 2-D dots
  several times faster than that of batched 3-D contractions, and TPU/GPU
  compile both to the same kernel. `dtype` is the compute dtype.
  """
  if dtype is not None:
    x, w = x.astype(dtype), w.astype(dtype)
  lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  if x.shape[x.ndim - n_in:] != ins:
    raise ValueError(f'project: input dims {x.shape} do not match weight dims {w.shape}')
  y = x.reshape(-1, math.prod(ins)) @ w.reshape(math.prod(ins), -1)
  return y.reshape(*lead, *outs)
