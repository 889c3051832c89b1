"""ModelConfig -> DecoderSpec: the only code that reads the model config.

Every module below is built from a small frozen spec of its own part
(attention, infini, mlp, moe, block, embedder, decoder); this function is
"whoever builds the decoder" of STYLE.md. It resolves names to specs once:
the attention kind ('infini' is a sublayer of its own, the rest are kernels
of `Attention`), which layers of the period are sliding-window or MoE, the
compute dtype 'auto', and the chunk size of the chunked kernels.

The layer pattern: one *period* of `config.layer_period(cfg)` layers,
`local_layers` sliding-window layers then a global one, and an MoE
feed-forward in every `moe.moe_every`-th layer; the decoder scans over
`num_layers // period` repeats of it, then runs the first
`num_layers % period` blocks of one more (the tail, dense layers only). Imports config and the model modules.
"""

from __future__ import annotations

import jax
from flax import nnx

from gemjax.batch import patch_dims
from gemjax.config import ModelConfig, layer_period
from gemjax.model.attention import AttentionSpec
from gemjax.model.block import BlockSpec
from gemjax.model.decoder import Decoder, DecoderSpec
from gemjax.model.embed import EmbedderSpec
from gemjax.model.infini import InfiniSpec
from gemjax.model.mlp import MLPSpec
from gemjax.model.moe import MoESpec
from gemjax.model.rope import NO_SCALING


def resolve_compute_dtype(name: str) -> str:
  """'auto': float32 on CPU, bfloat16 on GPU/TPU."""
  if name == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return name


def rope_scaling(cfg: ModelConfig) -> tuple:
  r = cfg.rope_scaling
  return (r.kind, float(r.factor), float(r.low_freq_factor), float(r.high_freq_factor),
          int(r.original_max_len))


def attention_spec(cfg: ModelConfig, *, kernel: str, window: int = 0,
                   causal: bool = True) -> AttentionSpec:
  # Sliding-window layers may have a RoPE of their own (Gemma 3: 10k, unscaled).
  own_local_rope = window > 0 and cfg.local_rope_base > 0
  return AttentionSpec(
      d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      rope_base=cfg.local_rope_base if own_local_rope else cfg.rope_base,
      mrope_sections=tuple(cfg.mrope_sections),
      rope_scaling=NO_SCALING if own_local_rope else rope_scaling(cfg),
      qk_norm=cfg.qk_norm, norm_plus_one=cfg.norm_plus_one,
      softcap=cfg.attn_softcap, query_scale=cfg.query_scale, kernel=kernel,
      block=cfg.attention_block, window=window, causal=causal, norm_eps=cfg.norm_eps,
      compute_dtype=resolve_compute_dtype(cfg.compute_dtype), param_dtype=cfg.param_dtype)


def _attention(cfg: ModelConfig, window: int):
  if cfg.attention == 'infini':
    i = cfg.infini
    # Inside a segment the full score matrix: segments are short.
    return InfiniSpec(attention_spec(cfg, kernel='dense', window=window),
                      segment_len=i.segment_len, update=i.update, gate_lr_mult=i.gate_lr_mult)
  return attention_spec(cfg, kernel=cfg.attention, window=window)


def _feed_forward(cfg: ModelConfig, moe: bool):
  cd = resolve_compute_dtype(cfg.compute_dtype)
  if not moe:
    return MLPSpec(cfg.d_model, cfg.mlp_dim, compute_dtype=cd, param_dtype=cfg.param_dtype,
                   activation=cfg.mlp_activation)
  m = cfg.moe
  expert_dim = m.expert_dim or cfg.mlp_dim
  return MoESpec(cfg.d_model, expert_dim, m.num_experts, m.top_k,
                 shared_dim=m.shared_experts * expert_dim, renormalize=m.renormalize,
                 capacity_factor=m.capacity_factor, path=m.path,
                 dropless_buffer_factor=m.dropless_buffer_factor,
                 router_z_loss=m.router_z_loss, load_balance_loss=m.load_balance_loss,
                 compute_dtype=cd, param_dtype=cfg.param_dtype)


def _block(cfg: ModelConfig, attention, mlp) -> BlockSpec:
  return BlockSpec(attention, mlp, d_model=cfg.d_model, norm_eps=cfg.norm_eps,
                   param_dtype=cfg.param_dtype, norm_plus_one=cfg.norm_plus_one,
                   post_norms=cfg.post_norms)


def period_specs(cfg: ModelConfig) -> tuple[BlockSpec, ...]:
  """The blocks of one period of the layer pattern."""
  attn_period = cfg.local_layers + 1
  moe_every = cfg.moe.moe_every if cfg.moe.num_experts else 1
  blocks = []
  for i in range(layer_period(cfg)):
    # local_layers -1: every layer slides.
    local = cfg.local_layers < 0 or (cfg.local_layers > 0 and (i % attn_period) < cfg.local_layers)
    is_moe = cfg.moe.num_experts > 0 and (i + 1) % moe_every == 0
    blocks.append(_block(cfg, _attention(cfg, cfg.window if local else 0),
                         _feed_forward(cfg, is_moe)))
  return tuple(blocks)


def embedder_spec(cfg: ModelConfig) -> EmbedderSpec:
  dims = tuple(patch_dims(cfg).items())
  # Late-fusion encoders: bidirectional full attention inside each media block.
  encoder = _block(cfg, attention_spec(cfg, kernel='dense', causal=False),
                   _feed_forward(cfg, moe=False))
  return EmbedderSpec(
      d_model=cfg.d_model, patch_dims=dims, encoder=encoder,
      encoder_layers=cfg.encoder_layers, share_visual=cfg.share_visual_embedder,
      freeze_encoders=cfg.freeze_encoder and cfg.encoder_layers > 0, norm_eps=cfg.norm_eps,
      norm_plus_one=cfg.norm_plus_one, embed_scale=cfg.embed_scale,
      compute_dtype=resolve_compute_dtype(cfg.compute_dtype), param_dtype=cfg.param_dtype)


def decoder_spec(cfg: ModelConfig) -> DecoderSpec:
  """The spec of the whole model a (validated) ModelConfig describes."""
  period = period_specs(cfg)
  tail = period[:cfg.num_layers % len(period)]
  if any(b.is_moe for b in tail):
    raise ValueError(f'num_layers={cfg.num_layers} is not a multiple of the layer '
                     f'pattern period {len(period)} and the rest would hold MoE layers')
  return DecoderSpec(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, period=period, tail=tail,
      num_groups=cfg.num_layers // len(period), embedder=embedder_spec(cfg),
      tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std, norm_eps=cfg.norm_eps,
      norm_plus_one=cfg.norm_plus_one, final_softcap=cfg.final_softcap,
      remat=cfg.remat, scan_layers=cfg.scan_layers,
      compute_dtype=resolve_compute_dtype(cfg.compute_dtype), param_dtype=cfg.param_dtype)


def build_decoder(cfg: ModelConfig, rngs: nnx.Rngs) -> Decoder:
  """`decoder_spec(cfg).build(rngs)`."""
  return decoder_spec(cfg).build(rngs)

