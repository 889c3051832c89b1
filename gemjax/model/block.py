"""One pre-norm transformer block and one period of the layer pattern.

    x + attn(norm(x));  x + ffn(norm(x))
    x + post_norm(attn(norm(x)));  ...     with `post_norms` (Gemma 2/3)

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
  norm_plus_one: bool = True
  post_norms: bool = False

  def build(self, rngs: nnx.Rngs) -> 'Block':
    return Block(self, rngs=rngs)

  @property
  def is_moe(self) -> bool:
    return isinstance(self.mlp, MoESpec)


class Block(nnx.Module):

  def __init__(self, spec: BlockSpec, *, rngs: nnx.Rngs):
    pd = dtype(spec.param_dtype)
    norm = lambda: RMSNorm(spec.d_model, eps=spec.norm_eps, param_dtype=pd,
                           plus_one=spec.norm_plus_one)
    self.attn_norm = norm()
    self.attn = spec.attention.build(rngs)
    self.mlp_norm = norm()
    self.mlp = spec.mlp.build(rngs)
    self.attn_post_norm = norm() if spec.post_norms else None
    self.mlp_post_norm = norm() if spec.post_norms else None

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo, cache=None, *,
               prefill: bool = False):
    """Returns (x, aux, cache); with a cache, MoE layers drop no token."""
    a, cache = self.attn(self.attn_norm(x_BxTxD), info, cache, prefill=prefill)
    if self.attn_post_norm is not None:
      a = self.attn_post_norm(a)
    x_BxTxD = x_BxTxD + a.astype(x_BxTxD.dtype)
    y, aux = self.mlp(self.mlp_norm(x_BxTxD), info, no_drop=cache is not None)
    if self.mlp_post_norm is not None:
      y = self.mlp_post_norm(y)
    x_BxTxD = x_BxTxD + y.astype(x_BxTxD.dtype)
    return constrain(x_BxTxD, ('batch', 'length', 'act_embed')), aux, cache

  def init_cache(self, batch_size: int, max_len: int, dtype):
    return self.attn.init_cache(batch_size, max_len, dtype)


class LayerGroup(nnx.Module):
  """One period of the layer pattern (usually a single block)."""

  def __init__(self, period: tuple[BlockSpec, ...], *, rngs: nnx.Rngs):
    self.blocks = nnx.List([spec.build(rngs) for spec in period])

  def __call__(self, x_BxTxD, info, caches=None, *, prefill: bool = False):
    """Returns (x, per-block aux list, per-block cache list or None)."""
    auxes, new_caches = [], []
    for i, block in enumerate(self.blocks):
      x_BxTxD, aux, c = block(x_BxTxD, info, None if caches is None else caches[i],
                              prefill=prefill)
      auxes.append(aux)
      new_caches.append(c)
    return x_BxTxD, auxes, (None if caches is None else new_caches)
