"""Where modalities become embeddings: the only modality-specific model code.

Continuous inputs (image / audio / video patches) go through a per-modality
linear patch embedder (video frames optionally through the image one:
`share_visual`) and, for the late-fusion baseline, a small per-modality
encoder stack (`encoder_layers > 0`; bidirectional inside each media block).
The results are scattered into their slots of the one token sequence with a
static-shape scatter; a learned per-modality embedding is added to every
token. Early fusion is `encoder_layers = 0`: the decoder sees linear patch
embeddings and does all the mixing itself (Chameleon / Fuyu style).
Imports the batch contract (modality names, patch keys) and model blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.batch import CONTINUOUS_MODALITIES, MODALITY_NAMES, patch_keys
from gemjax.model.block import BlockSpec
from gemjax.model.info import SequenceInfo
from gemjax.model.norm import RMSNorm
from gemjax.model.params import constant, dtype, fan_in_std, freeze, param
from gemjax.parallel.sharding import constrain


def gather_slots(x_BxT: jax.Array, slots_BxP: jax.Array, fill=0) -> jax.Array:
  """x at each slot (any trailing dims); `fill` where the slot is -1."""
  idx = jnp.maximum(slots_BxP, 0)
  out = jnp.take_along_axis(x_BxT, idx.reshape(idx.shape + (1,) * (x_BxT.ndim - 2)), axis=1)
  valid = (slots_BxP >= 0).reshape(slots_BxP.shape + (1,) * (x_BxT.ndim - 2))
  return jnp.where(valid, out, fill)


def scatter_slots(x_BxTxD: jax.Array, emb_BxPxD: jax.Array, slots_BxP: jax.Array) -> jax.Array:
  """Writes each patch embedding over its slot; padding slots (-1) are dropped."""
  T = x_BxTxD.shape[1]
  idx = jnp.where(slots_BxP < 0, T, slots_BxP)  # out of bounds -> dropped
  return jax.vmap(lambda x, e, i: x.at[i].set(e.astype(x.dtype), mode='drop'))(
      x_BxTxD, emb_BxPxD, idx)


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
  """Token table lookups + per-modality patch encoders.

  `patch_dims`: (modality, flattened patch size) for each continuous modality
  with an embedder; `encoder`: the bidirectional block of the late-fusion
  encoders, used `encoder_layers` times (0 = early fusion). `share_visual`:
  video frames use the image encoder (there is no video encoder of its own).
  """
  d_model: int
  patch_dims: tuple[tuple[str, int], ...]
  encoder: BlockSpec
  encoder_layers: int = 0
  share_visual: bool = False
  freeze_encoders: bool = False
  norm_eps: float = 1e-6
  compute_dtype: str = 'float32'
  param_dtype: str = 'float32'
  norm_plus_one: bool = True
  # Token embeddings times sqrt(d_model) (Gemma); patch embeddings are not.
  embed_scale: bool = False

  def build(self, rngs: nnx.Rngs) -> 'InputEmbedder':
    return InputEmbedder(self, rngs=rngs)


class PatchEncoder(nnx.Module):
  """Linear patch embedding (+ optional bidirectional encoder blocks)."""

  def __init__(self, spec: EmbedderSpec, patch_dim: int, *, rngs: nnx.Rngs):
    pd = dtype(spec.param_dtype)
    self.compute_dtype = dtype(spec.compute_dtype)
    self.proj_PxD = param(rngs, (patch_dim, spec.d_model), ('patch', 'embed'),
                          std=fan_in_std(patch_dim), dtype=pd)
    self.in_norm = RMSNorm(spec.d_model, eps=spec.norm_eps, param_dtype=pd,
                           plus_one=spec.norm_plus_one)
    self.blocks = nnx.List([spec.encoder.build(rngs) for _ in range(spec.encoder_layers)])

  def __call__(self, patches_BxPxD: jax.Array, info: SequenceInfo) -> jax.Array:
    cd = self.compute_dtype
    x = jnp.einsum('bpi,id->bpd', patches_BxPxD.astype(cd), self.proj_PxD[...].astype(cd))
    x = self.in_norm(x)
    for block in self.blocks:
      x, _, _ = block(x, info)
    return x


class InputEmbedder(nnx.Module):
  """Token table lookups + patch encoders + modality embeddings -> x_BxTxD."""

  def __init__(self, spec: EmbedderSpec, *, rngs: nnx.Rngs):
    self.compute_dtype = dtype(spec.compute_dtype)
    self.token_mult = spec.d_model ** 0.5 if spec.embed_scale else 0.0
    self.modality_MxD = constant(
        jnp.zeros((len(MODALITY_NAMES), spec.d_model), dtype(spec.param_dtype)), (None, 'embed'))
    dims = dict(spec.patch_dims)
    self.shared_visual = spec.share_visual and 'image' in dims and 'video' in dims
    if self.shared_visual:
      if dims['image'] != dims['video']:
        raise ValueError(f'share_visual: image and video patches must have one size, got '
                         f'{dims["image"]} and {dims["video"]}')
      del dims['video']
    self.encoders = nnx.Dict({m: PatchEncoder(spec, d, rngs=rngs) for m, d in dims.items()})
    if spec.freeze_encoders:
      freeze(self.encoders)

  def __call__(self, embedding_VxD: jax.Array, batch: Mapping[str, jax.Array],
               info: SequenceInfo) -> jax.Array:
    cd = self.compute_dtype
    x = jnp.take(embedding_VxD, batch['tokens'], axis=0).astype(cd)
    if self.token_mult:
      x = x * jnp.asarray(self.token_mult, cd)
    x = x + jnp.take(self.modality_MxD[...], batch['modality'].astype(jnp.int32), axis=0).astype(cd)
    for m in CONTINUOUS_MODALITIES:
      pk, sk = patch_keys(m)
      if pk not in batch:
        continue
      enc = 'image' if (m == 'video' and self.shared_visual) else m
      if enc not in self.encoders:
        raise ValueError(f'the batch has {pk} but model.{m}_patch_dim is 0 (no {m} embedder)')
      patches, slots = batch[pk], batch[sk]
      P = slots.shape[1]
      # Encoders see one media block at a time: (segment, block) is the unit.
      seg = gather_slots(info.segment_ids_BxT, slots) * 65536 + gather_slots(info.block_ids_BxT, slots)
      patch_info = SequenceInfo(
          positions_BxTx3=gather_slots(info.positions_BxTx3, slots),
          segment_ids_BxT=seg,
          block_ids_BxT=gather_slots(info.block_ids_BxT, slots),
          index_BxT=jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), slots.shape),
          modality_BxT=gather_slots(info.modality_BxT, slots))
      emb = self.encoders[enc](patches, patch_info)
      # Patch slots keep their modality embedding on top of the patch embedding.
      emb = emb + jnp.take(self.modality_MxD[...], patch_info.modality_BxT.astype(jnp.int32),
                           axis=0).astype(cd)
      x = scatter_slots(x, emb, slots)
    return constrain(x, ('batch', 'length', 'act_embed'))
