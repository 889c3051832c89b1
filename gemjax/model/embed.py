"""Where modalities become embeddings: the only modality-specific model code.

Continuous inputs (image / audio / video patches) go through a per-modality
linear patch embedder and, for the late-fusion baseline, a small per-modality
encoder stack (`encoder_layers > 0`; bidirectional inside each media block).
The results are scattered into their slots of the one token sequence with a
static-shape scatter; a learned per-modality embedding is added to every
token. Early fusion is `encoder_layers = 0`: the decoder sees linear patch
embeddings and does all the mixing itself (Chameleon / Fuyu style).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.batch import CONTINUOUS_MODALITIES, MODALITY_NAMES, patch_keys
from gemjax.model.layers import RMSNorm, SequenceInfo, fan_in_std, param
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


class PatchEncoder(nnx.Module):
  """Linear patch embedding (+ optional bidirectional encoder blocks)."""

  def __init__(self, cfg, patch_dim: int, *, rngs: nnx.Rngs):
    from gemjax.model import registry  # late: registry imports decoder pieces
    from gemjax.model.decoder import Block
    pd = registry.param_dtype(cfg)
    self.compute_dtype = registry.compute_dtype(cfg)
    self.proj_PxD = param(rngs, (patch_dim, cfg.d_model), ('patch', 'embed'),
                          std=fan_in_std(patch_dim), dtype=pd)
    self.in_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
    spec = registry.LayerSpec(attention='dense', mlp='swiglu', causal=False)
    self.blocks = nnx.List([Block(cfg, spec, rngs=rngs) for _ in range(cfg.encoder_layers)])

  def __call__(self, patches_BxPxD: jax.Array, info: SequenceInfo) -> jax.Array:
    cd = self.compute_dtype
    x = jnp.einsum('bpi,id->bpd', patches_BxPxD.astype(cd), self.proj_PxD[...].astype(cd))
    x = self.in_norm(x)
    for block in self.blocks:
      x, _ = block(x, info)
    return x


class InputEmbedder(nnx.Module):
  """Token table lookups + patch encoders + modality embeddings -> x_BxTxD."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    from gemjax.model import registry
    self.compute_dtype = registry.compute_dtype(cfg)
    self.modality_MxD = nnx.Param(
        jnp.zeros((len(MODALITY_NAMES), cfg.d_model), registry.param_dtype(cfg)),
        out_sharding=(None, 'embed'), eager_sharding=False)
    dims = {'image': cfg.image_patch_dim, 'audio': cfg.audio_patch_dim,
            'video': cfg.video_patch_dim}
    self.encoders = nnx.Dict({m: PatchEncoder(cfg, d, rngs=rngs)
                              for m, d in dims.items() if d > 0})

  def __call__(self, embedding_VxD: jax.Array, batch: Mapping[str, jax.Array],
               info: SequenceInfo) -> jax.Array:
    cd = self.compute_dtype
    x = jnp.take(embedding_VxD, batch['tokens'], axis=0).astype(cd)
    x = x + jnp.take(self.modality_MxD[...], batch['modality'].astype(jnp.int32), axis=0).astype(cd)
    for m in CONTINUOUS_MODALITIES:
      pk, sk = patch_keys(m)
      if pk not in batch:
        continue
      if m not in self.encoders:
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
      emb = self.encoders[m](patches, patch_info)
      # Patch slots keep their modality embedding on top of the patch embedding.
      emb = emb + jnp.take(self.modality_MxD[...], patch_info.modality_BxT.astype(jnp.int32),
                           axis=0).astype(cd)
      x = scatter_slots(x, emb, slots)
    return constrain(x, ('batch', 'length', 'act_embed'))
