"""The one decoder every modality flows through.

    tokens -> embed (+ continuous patch embeddings scattered into their slots)
           -> scan over L // period repeats of [pre-norm block x period]
           -> the first L % period blocks of a period, unscanned (the tail)
           -> final RMSNorm -> logits over the one vocabulary

Layers are created stacked (a leading 'layers' axis on every parameter, via
`nnx.vmap`) and applied with `jax.lax.scan`, so compile time does not grow with
depth; the scan body is rematerialised with the configured policy. Built
from a `DecoderSpec` (gemjax/model/spec.py turns a ModelConfig into one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.kernels.cache import KVCache
from gemjax.model.block import BlockSpec, LayerGroup
from gemjax.model.embed import EmbedderSpec
from gemjax.model.info import SequenceInfo, sequence_info
from gemjax.model.norm import RMSNorm
from gemjax.model.params import dtype, param
from gemjax.parallel import kv_cache
from gemjax.parallel.sharding import constrain

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_qkv_proj': jax.checkpoint_policies.save_only_these_names('qkv'),
}


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """The whole model: embedder, `num_groups` repeats of `period`, `tail`
  (a partial period: pretrained layer patterns such as Gemma 3's 26 layers
  of period 6), head."""
  vocab_size: int
  d_model: int
  period: tuple[BlockSpec, ...]
  num_groups: int
  embedder: EmbedderSpec
  tail: tuple[BlockSpec, ...] = ()
  tie_embeddings: bool = True
  init_std: float = 0.02
  norm_eps: float = 1e-6
  norm_plus_one: bool = True
  # Output logits soft-cap, cap * tanh(logits / cap) (Gemma 2); 0 = off.
  final_softcap: float = 0.0
  remat: str = 'none'
  scan_layers: bool = True
  compute_dtype: str = 'float32'
  param_dtype: str = 'float32'

  def build(self, rngs: nnx.Rngs) -> 'Decoder':
    return Decoder(self, rngs=rngs)

  @property
  def num_layers(self) -> int:
    return self.num_groups * len(self.period) + len(self.tail)

  @property
  def blocks(self) -> tuple[BlockSpec, ...]:
    """Every layer's spec, in order."""
    return self.period * self.num_groups + self.tail


class Decoder(nnx.Module):

  def __init__(self, spec: DecoderSpec, *, rngs: nnx.Rngs):
    self.remat, self.scan_layers = spec.remat, spec.scan_layers
    self.tie_embeddings = spec.tie_embeddings
    pd = dtype(spec.param_dtype)
    self.compute_dtype = dtype(spec.compute_dtype)
    self.embedding_VxD = param(rngs, (spec.vocab_size, spec.d_model), ('vocab', 'embed'),
                               std=spec.init_std, dtype=pd)
    self.inputs = spec.embedder.build(rngs)
    self.num_groups = spec.num_groups
    period = spec.period

    @nnx.split_rngs(splits=self.num_groups)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_groups(rngs):
      return LayerGroup(period, rngs=rngs)

    self.layers = make_groups(rngs)
    self.tail = LayerGroup(spec.tail, rngs=rngs) if spec.tail else None
    self.final_norm = RMSNorm(spec.d_model, eps=spec.norm_eps, param_dtype=pd,
                              plus_one=spec.norm_plus_one)
    self.final_softcap = spec.final_softcap
    if not spec.tie_embeddings:
      self.head_DxV = param(rngs, (spec.d_model, spec.vocab_size), ('embed', 'vocab'),
                            std=spec.d_model ** -0.5, dtype=pd)

  # -- pieces -------------------------------------------------------------

  def embed(self, batch: Mapping[str, jax.Array], info: SequenceInfo) -> jax.Array:
    return self.inputs(self.embedding_VxD[...], batch, info)

  def sequence_info(self, batch: Mapping[str, jax.Array]) -> SequenceInfo:
    return sequence_info(batch)

  def run_layers(self, x_BxTxD: jax.Array, info: SequenceInfo, cache=None, *,
                 prefill: bool = False):
    """The scanned layer groups; `cache` (stacked per group, see `init_cache`)
    is scanned alongside the parameters and returned updated (None if none)."""
    graphdef, state = nnx.split(self.layers)

    def body(x, xs):
      group_state, group_cache = xs
      group = nnx.merge(graphdef, group_state)
      x, aux, group_cache = group(x, info, group_cache, prefill=prefill)
      return x, (aux, group_cache)

    policy = self.remat
    if policy != 'none' and cache is None:
      body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    period = len(self.layers.blocks)
    tail_cache = None if cache is None else cache[period:]
    cache = None if cache is None else cache[:period]
    if self.scan_layers:
      x_BxTxD, (aux, cache) = jax.lax.scan(body, x_BxTxD, (state, cache))
    else:
      outs = []
      for i in range(self.num_groups):
        x_BxTxD, out = body(x_BxTxD, jax.tree.map(lambda s: s[i], (state, cache)))
        outs.append(out)
      aux, cache = jax.tree.map(lambda *xs: jnp.stack(xs), *outs) if outs else ([], None)
    if self.tail is not None:
      run_tail = lambda x, c: self.tail(x, info, c, prefill=prefill)
      if policy != 'none' and tail_cache is None:
        run_tail = jax.checkpoint(run_tail, policy=REMAT_POLICIES[policy], prevent_cse=False)
      # Dense tails only (config validation): their aux dicts are empty.
      x_BxTxD, _, tail_cache = run_tail(x_BxTxD, tail_cache)
      if cache is not None:
        cache = list(cache) + list(tail_cache)
    return x_BxTxD, aux, cache

  def init_cache(self, batch_size: int, max_len: int, dtype=None):
    """An empty decoding cache for `batch_size` rows of up to `max_len` tokens.

    A list with one entry per block of the layer period, each stacked over
    the `num_groups` repeats (the scan's leading axis), then one unstacked
    entry per block of the tail: a `KVCache` for
    attention layers ([B, G, S, K] keys and values, S = `max_len` slots, or
    `window` for sliding-window layers),
    an `InfiniCache` for Infini-attention. Arrays are laid out like the
    activations (batch over the data-like axes, KV heads over 'tensor',
    slots over 'context' where they split evenly).
    """
    dtype = dtype or self.compute_dtype
    caches = []
    for block in self.layers.blocks:
      one = block.init_cache(batch_size, max_len, dtype)
      stacked = jax.tree.map(
          lambda a: jnp.broadcast_to(a, (self.num_groups,) + a.shape), one)
      caches.append(_constrain_cache(stacked))
    for block in (self.tail.blocks if self.tail is not None else []):
      caches.append(_constrain_cache(block.init_cache(batch_size, max_len, dtype),
                                     stacked=False))
    return caches

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    # Flattened tokens: a 2-D matmul (see params.project for why).
    x_NxD = self.final_norm(x_BxTxD).astype(self.compute_dtype).reshape(b * t, d)
    if self.tie_embeddings:
      w = self.embedding_VxD[...].astype(self.compute_dtype)
      logits = jnp.einsum('nd,vd->nv', x_NxD, w, preferred_element_type=jnp.float32)
    else:
      w = self.head_DxV[...].astype(self.compute_dtype)
      logits = jnp.einsum('nd,dv->nv', x_NxD, w, preferred_element_type=jnp.float32)
    if self.final_softcap:
      logits = self.final_softcap * jnp.tanh(logits / self.final_softcap)
    return constrain(logits.reshape(b, t, -1), ('batch', 'length', 'act_vocab'))

  def __call__(self, batch: Mapping[str, jax.Array], cache=None, *, prefill: bool = False):
    """Returns (logits_BxTxV float32, aux, cache).

    aux holds per-layer extras. `cache` (from `init_cache`) makes this a
    decoding call, returning the updated cache: `prefill=True` for a whole
    prompt, False for new text-like tokens (see `Attention.__call__`).
    Without one the returned cache is None (training).
    """
    info = self.sequence_info(batch)
    x = self.embed(batch, info)
    x, aux, cache = self.run_layers(x, info, cache, prefill=prefill)
    return self.logits(x), aux, cache


def _constrain_cache(cache, stacked: bool = True):
  """A layer cache laid out like the activations (leading axis: groups, when
  `stacked`)."""
  lead = (None,) if stacked else ()
  if isinstance(cache, KVCache):
    names = kv_cache.cache_sharding_names(cache.index_BxS.shape[-1])
    return KVCache(constrain(cache.k_BxGxSxK, (*lead, *names)),
                   constrain(cache.v_BxGxSxK, (*lead, *names)),
                   constrain(cache.index_BxS, (*lead, names[0], names[2])))
  return jax.tree.map(
      lambda a: constrain(a, (*lead, 'batch') + (None,) * (a.ndim - 1 - len(lead))), cache)


def flatten_aux(aux: Any) -> dict[str, jax.Array]:
  """Per-group lists of per-block dicts -> {'name/block{i}': stacked values}."""
  out = {}
  for i, block_aux in enumerate(aux or []):
    for k, v in block_aux.items():
      out[f'{k}/block{i}'] = v
  return out
