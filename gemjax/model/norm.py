"""RMSNorm (Zhang & Sennrich 2019), statistics in float32.

The scale is (1 + w) with w starting at zero (gemjax, Gemma), or w itself
starting at one (`plus_one=False`: Llama, Mistral); identity at init either
way, and never weight-decayed. Imports jax, flax and `gemjax.model.params`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.model.params import WEIGHT_DECAY, constant


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
               names: Sequence[str | None] = ('norm',), plus_one: bool = True):
    self.eps = eps
    self.offset = 1.0 if plus_one else 0.0
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = constant(init((dim,), param_dtype), names, **{WEIGHT_DECAY: False})

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * (self.offset + self.scale[...].astype(jnp.float32))
    return y.astype(x.dtype)
