"""The dense feed-forward sublayer: SwiGLU or GeGLU (Shazeer 2020).

Every feed-forward sublayer (this one, MoE) returns `(y_BxTxD, aux)` where
`aux` is a dict of scalars/arrays: keys ending in `_loss` are added to the
training loss (already weighted), the rest are logged as metrics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.model.info import SequenceInfo
from gemjax.model.params import dtype, fan_in_std, param, project
from gemjax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MLPSpec:
  d_model: int
  mlp_dim: int
  compute_dtype: str = 'float32'
  param_dtype: str = 'float32'
  # The gate's nonlinearity: 'silu' (SwiGLU) | 'gelu_tanh' (GeGLU).
  activation: str = 'silu'

  def build(self, rngs: nnx.Rngs) -> 'SwiGLU':
    return SwiGLU(self.d_model, self.mlp_dim, compute_dtype=dtype(self.compute_dtype),
                  param_dtype=dtype(self.param_dtype), activation=self.activation,
                  rngs=rngs)

  @property
  def matmul_params(self) -> int:
    return 3 * self.d_model * self.mlp_dim


ACTIVATIONS = {
    'silu': jax.nn.silu,
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}


class SwiGLU(nnx.Module):
  """down(act(x @ gate) * (x @ up)); act = silu is SwiGLU, gelu_tanh GeGLU."""

  def __init__(self, d_model: int, mlp_dim: int, *, compute_dtype=jnp.float32,
               param_dtype=jnp.float32, activation: str = 'silu', rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.activation = activation
    std_in, std_out = fan_in_std(d_model), fan_in_std(mlp_dim)
    self.w_gate_DxF = param(rngs, (d_model, mlp_dim), ('embed', 'mlp'), std=std_in, dtype=param_dtype)
    self.w_up_DxF = param(rngs, (d_model, mlp_dim), ('embed', 'mlp'), std=std_in, dtype=param_dtype)
    self.w_down_FxD = param(rngs, (mlp_dim, d_model), ('mlp', 'embed'), std=std_out, dtype=param_dtype)

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo | None = None, *,
               no_drop: bool = False):
    del no_drop   # a dense MLP never drops tokens
    cd = self.compute_dtype
    gate_BxTxF = project(x_BxTxD, self.w_gate_DxF[...], dtype=cd)
    up_BxTxF = project(x_BxTxD, self.w_up_DxF[...], dtype=cd)
    h_BxTxF = constrain(ACTIVATIONS[self.activation](gate_BxTxF) * up_BxTxF, ('batch', 'length', 'act_mlp'))
    y = project(h_BxTxF, self.w_down_FxD[...], dtype=cd)
    return constrain(y, ('batch', 'length', 'act_embed')), {}
