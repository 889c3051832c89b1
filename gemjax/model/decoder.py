"""The one decoder every modality flows through.

    tokens -> embed (+ continuous patch embeddings scattered into their slots)
           -> scan over L/period repeats of [pre-norm block x period]
           -> final RMSNorm -> logits over the one vocabulary

Layers are created stacked (a leading 'layers' axis on every parameter, via
`nnx.vmap`) and applied with `jax.lax.scan`, so compile time does not grow with
depth; the scan body is rematerialised with the configured policy.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.model import registry
from gemjax.model.embed import InputEmbedder
from gemjax.model.layers import RMSNorm, SequenceInfo, param
from gemjax.parallel.sharding import constrain

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_qkv_proj': jax.checkpoint_policies.save_only_these_names('qkv'),
}


class Block(nnx.Module):
  """x + attn(norm(x)); x + ffn(norm(x))."""

  def __init__(self, cfg, spec: registry.LayerSpec, *, rngs: nnx.Rngs):
    pd = registry.param_dtype(cfg)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
    self.attn = registry.ATTENTION[spec.attention](cfg, spec, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
    self.mlp = registry.MLP[spec.mlp](cfg, spec, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo):
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), info).astype(x_BxTxD.dtype)
    y, aux = self.mlp(self.mlp_norm(x_BxTxD), info)
    x_BxTxD = x_BxTxD + y.astype(x_BxTxD.dtype)
    return constrain(x_BxTxD, ('batch', 'length', 'act_embed')), aux


class LayerGroup(nnx.Module):
  """One period of the layer pattern (usually a single block)."""

  def __init__(self, cfg, plan: list[registry.LayerSpec], *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, spec, rngs=rngs) for spec in plan])

  def __call__(self, x_BxTxD, info):
    auxes = []
    for block in self.blocks:
      x_BxTxD, aux = block(x_BxTxD, info)
      auxes.append(aux)
    return x_BxTxD, auxes


class Decoder(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.remat, self.scan_layers = cfg.remat, cfg.scan_layers
    self.tie_embeddings = cfg.tie_embeddings
    pd = registry.param_dtype(cfg)
    self.compute_dtype = registry.compute_dtype(cfg)
    self.embedding_VxD = param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
                               std=cfg.init_std, dtype=pd)
    self.inputs = InputEmbedder(cfg, rngs=rngs)
    plan = registry.layer_plan(cfg)
    self.num_groups = cfg.num_layers // len(plan)

    @nnx.split_rngs(splits=self.num_groups)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_groups(rngs):
      return LayerGroup(cfg, plan, rngs=rngs)

    self.layers = make_groups(rngs)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
    if not cfg.tie_embeddings:
      self.head_DxV = param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                            std=cfg.d_model ** -0.5, dtype=pd)

  # -- pieces -------------------------------------------------------------

  def embed(self, batch: Mapping[str, jax.Array], info: SequenceInfo) -> jax.Array:
    return self.inputs(self.embedding_VxD[...], batch, info)

  def sequence_info(self, batch: Mapping[str, jax.Array]) -> SequenceInfo:
    tokens = batch['tokens']
    B, T = tokens.shape
    index = batch.get('token_index')
    if index is None:
      index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return SequenceInfo(
        positions_BxTx3=batch['positions'], segment_ids_BxT=batch['segment_ids'],
        block_ids_BxT=batch['block_ids'], index_BxT=index,
        modality_BxT=batch['modality'])

  def run_layers(self, x_BxTxD: jax.Array, info: SequenceInfo):
    graphdef, state = nnx.split(self.layers)

    def body(x, group_state):
      group = nnx.merge(graphdef, group_state)
      return group(x, info)

    policy = self.remat
    if policy != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    if self.scan_layers:
      x_BxTxD, aux = jax.lax.scan(body, x_BxTxD, state)
    else:
      auxes = []
      for i in range(self.num_groups):
        x_BxTxD, a = body(x_BxTxD, jax.tree.map(lambda s: s[i], state))
        auxes.append(a)
      aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes and auxes[0] else auxes[0]
    return x_BxTxD, aux

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    # Flattened tokens: a 2-D matmul (see layers.project for why).
    x_NxD = self.final_norm(x_BxTxD).astype(self.compute_dtype).reshape(b * t, d)
    if self.tie_embeddings:
      w = self.embedding_VxD[...].astype(self.compute_dtype)
      logits = jnp.einsum('nd,vd->nv', x_NxD, w, preferred_element_type=jnp.float32)
    else:
      w = self.head_DxV[...].astype(self.compute_dtype)
      logits = jnp.einsum('nd,dv->nv', x_NxD, w, preferred_element_type=jnp.float32)
    return constrain(logits.reshape(b, t, -1), ('batch', 'length', 'act_vocab'))

  def __call__(self, batch: Mapping[str, jax.Array]):
    """Returns (logits_BxTxV float32, aux) where aux holds per-layer extras."""
    info = self.sequence_info(batch)
    x = self.embed(batch, info)
    x, aux = self.run_layers(x, info)
    return self.logits(x), aux


def flatten_aux(aux: Any) -> dict[str, jax.Array]:
  """Per-group lists of per-block dicts -> {'name/block{i}': stacked values}."""
  out = {}
  for i, block_aux in enumerate(aux or []):
    for k, v in block_aux.items():
      out[f'{k}/block{i}'] = v
  return out
