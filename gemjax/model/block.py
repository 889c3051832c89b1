"""One pre-norm transformer block and one period of the layer pattern.

    x + attn(norm(x));  x + ffn(norm(x))

A block is built from a `BlockSpec` (its attention and feed-forward specs);
the decoder and the late-fusion encoders use the same block. Imports the
sublayer modules.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
from flax import nnx

from gemjax.model.attention import AttentionSpec
from gemjax.model.infini import InfiniSpec
from gemjax.model.info import SequenceInfo
from gemjax.model.mlp import MLPSpec
from gemjax.model.moe import MoESpec
from gemjax.model.norm import RMSNorm
from gemjax.model.params import dtype
from gemjax.parallel.sharding import constrain

AttentionLike = Union[AttentionSpec, InfiniSpec]
FeedForward = Union[MLPSpec, MoESpec]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  attention: AttentionLike
  mlp: FeedForward
  d_model: int
  norm_eps: float = 1e-6
  param_dtype: str = 'float32'

  def build(self, rngs: nnx.Rngs) -> 'Block':
    return Block(self, rngs=rngs)

  @property
  def is_moe(self) -> bool:
    return isinstance(self.mlp, MoESpec)


class Block(nnx.Module):

  def __init__(self, spec: BlockSpec, *, rngs: nnx.Rngs):
    pd = dtype(spec.param_dtype)
    self.attn_norm = RMSNorm(spec.d_model, eps=spec.norm_eps, param_dtype=pd)
    self.attn = spec.attention.build(rngs)
    self.mlp_norm = RMSNorm(spec.d_model, eps=spec.norm_eps, param_dtype=pd)
    self.mlp = spec.mlp.build(rngs)

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo):
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), info).astype(x_BxTxD.dtype)
    y, aux = self.mlp(self.mlp_norm(x_BxTxD), info)
    x_BxTxD = x_BxTxD + y.astype(x_BxTxD.dtype)
    return constrain(x_BxTxD, ('batch', 'length', 'act_embed')), aux


class LayerGroup(nnx.Module):
  """One period of the layer pattern (usually a single block)."""

  def __init__(self, period: tuple[BlockSpec, ...], *, rngs: nnx.Rngs):
    self.blocks = nnx.List([spec.build(rngs) for spec in period])

  def __call__(self, x_BxTxD, info):
    auxes = []
    for block in self.blocks:
      x_BxTxD, aux = block(x_BxTxD, info)
      auxes.append(aux)
    return x_BxTxD, auxes
