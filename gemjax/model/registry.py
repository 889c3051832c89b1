"""Sublayers by name: the one place that turns config values into modules.

`model.attention` and `model.mlp` name entries here. A builder receives the
model config (it is the "whoever builds the decoder" of STYLE.md) and passes
plain numbers to the module it constructs; the module itself never sees the
config. New sublayers (MoE, ring, Infini-attention, ...) call
`register_attention` / `register_mlp` and need no change to the block.

`layer_plan(cfg)` says which sublayers each layer of one *period* uses (e.g.
5 local + 1 global, or MoE every 2nd layer); the decoder scans over repeats of
that period, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.errors import ConfigError
from gemjax.model import attention as attention_lib
from gemjax.model import mlp as mlp_lib
from gemjax.model.layers import DTYPES

Builder = Callable[..., nnx.Module]
ATTENTION: dict[str, Builder] = {}
MLP: dict[str, Builder] = {}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  attention: str
  mlp: str
  window: int = 0
  causal: bool = True


def register_attention(name: str):
  def deco(fn: Builder) -> Builder:
    ATTENTION[name] = fn
    return fn
  return deco


def register_mlp(name: str):
  def deco(fn: Builder) -> Builder:
    MLP[name] = fn
    return fn
  return deco


def compute_dtype(cfg) -> Any:
  if cfg.compute_dtype == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return DTYPES[cfg.compute_dtype]


def param_dtype(cfg) -> Any:
  return DTYPES[cfg.param_dtype]


def layer_plan(cfg) -> list[LayerSpec]:
  """The sublayers of one period of layers; `num_layers` is a multiple of it.

  Local/global: `local_layers` sliding-window layers then one global layer.
  MoE: the feed-forward of every `moe.moe_every`-th layer is 'moe'.
  """
  attn_period = cfg.local_layers + 1
  moe_every = cfg.moe.moe_every if cfg.moe.num_experts else 1
  period = math.lcm(attn_period, moe_every)
  plan = []
  for i in range(period):
    local = cfg.local_layers > 0 and (i % attn_period) < cfg.local_layers
    is_moe = cfg.moe.num_experts > 0 and (i + 1) % moe_every == 0
    plan.append(LayerSpec(attention=cfg.attention, mlp='moe' if is_moe else cfg.mlp,
                          window=cfg.window if local else 0))
  return plan


def check_names(cfg) -> None:
  for key, table in (('attention', ATTENTION), ('mlp', MLP)):
    name = getattr(cfg, key)
    if name not in table:
      close = difflib.get_close_matches(name, list(table), n=1)
      hint = f"; did you mean '{close[0]}'?" if close else ''
      raise ConfigError(f'model.{key}={name!r} is invalid: one of {sorted(table)}{hint}')
  if cfg.local_layers and cfg.window <= 0:
    raise ConfigError(f'model.window={cfg.window} is invalid: model.local_layers='
                      f'{cfg.local_layers} needs a positive sliding window')
  if cfg.moe.num_experts and 'moe' not in MLP:
    raise ConfigError('model.moe.num_experts > 0 but no MoE layer is registered')
  if cfg.moe.num_experts:
    _check_moe(cfg.moe)
  period = len(layer_plan(cfg))
  if cfg.num_layers % period:
    raise ConfigError(f'model.num_layers={cfg.num_layers} is invalid: must be a '
                      f'multiple of the layer pattern period {period}')


def _check_moe(m) -> None:
  def bad(key, valid):
    raise ConfigError(f'model.moe.{key}={getattr(m, key)!r} is invalid: {valid}')
  if m.num_experts < 0:
    bad('num_experts', 'a number of experts >= 0 (0 = dense)')
  if not 1 <= m.top_k <= m.num_experts:
    bad('top_k', f'must be in [1, model.moe.num_experts={m.num_experts}]')
  if m.moe_every < 1:
    bad('moe_every', 'must be >= 1 (every n-th layer is MoE)')
  for key in ('expert_dim', 'shared_experts'):
    if getattr(m, key) < 0:
      bad(key, 'must be >= 0')
  if m.capacity_factor <= 0:
    bad('capacity_factor', 'must be > 0')
  if m.path not in ('auto', 'capacity', 'dropless'):
    bad('path', "one of ('auto', 'capacity', 'dropless')")
  for key in ('router_z_loss', 'load_balance_loss'):
    if getattr(m, key) < 0:
      bad(key, 'a loss coefficient >= 0')


def _standard_attention(kernel: str) -> Builder:
  def build(cfg, spec: LayerSpec, *, rngs: nnx.Rngs) -> nnx.Module:
    return attention_lib.Attention(
        cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        rope_base=cfg.rope_base, mrope_sections=cfg.mrope_sections,
        qk_norm=cfg.qk_norm, kernel=kernel, window=spec.window, causal=spec.causal,
        norm_eps=cfg.norm_eps, compute_dtype=compute_dtype(cfg),
        param_dtype=param_dtype(cfg), rngs=rngs)
  return build


ATTENTION['dense'] = _standard_attention('dense')


@register_mlp('swiglu')
def _swiglu(cfg, spec: LayerSpec, *, rngs: nnx.Rngs) -> nnx.Module:
  return mlp_lib.SwiGLU(cfg.d_model, cfg.mlp_dim, compute_dtype=compute_dtype(cfg),
                        param_dtype=param_dtype(cfg), rngs=rngs)


from gemjax.model import moe  # noqa: E402,F401  registers 'moe'

from gemjax.model import blockwise, infini  # noqa: E402,F401  registers long-context attention
