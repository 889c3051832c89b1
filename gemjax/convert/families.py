"""Hugging Face model families <-> gemjax model configs and tensor names.

One `Family` per supported `model_type` says how its config.json maps onto
`ModelConfig` and where each of its tensors lives in gemjax's parameter
tree. The architectures differ only in options gemjax has (norm scale
convention, GeGLU, embedding scale, sandwich norms, soft-caps, query scale,
local/global RoPE, QK-norm, MoE), so a tensor is moved, transposed and
reshaped, never changed: import -> export is bit-exact.

    family      norm    mlp     extras
    llama       w       SwiGLU  RoPE scaling linear / llama3
    mistral     w       SwiGLU  sliding window on every layer (v0.1)
    mixtral     w       MoE     router [E, D], experts w1/w3/w2
    gemma       1 + w   GeGLU   embeddings x sqrt(d), tied
    gemma2      1 + w   GeGLU   + sandwich norms, soft-caps, query scale,
                                local/global layers
    gemma3_text 1 + w   GeGLU   + QK-norm, local RoPE base, no soft-caps

Imports only the standard library and gemjax's config and errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from gemjax.config import ModelConfig
from gemjax.errors import ConfigError

# Every leaf's transform: HF tensor (as stored, [out, in] for linears) ->
# gemjax array for one layer, and back. `dims` gives the model's sizes.
Dims = dict


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architecture: str
  norm_plus_one: bool
  activation: str            # 'silu' | 'gelu_tanh'
  embed_scale: bool = False
  post_norms: bool = False
  qk_norm: bool = False
  moe: bool = False
  softcaps: bool = False     # attn_logit_softcapping / final_logit_softcapping
  query_scalar: bool = False  # query_pre_attn_scalar
  local_rope: bool = False   # rope_parameters per layer type (Gemma 3)
  # Sliding windows it can express: 'none', 'all' (every layer or none),
  # 'pattern' (n sliding layers then a global one, or all).
  windows: str = 'none'


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family('llama', 'LlamaForCausalLM', norm_plus_one=False, activation='silu'),
    Family('mistral', 'MistralForCausalLM', norm_plus_one=False, activation='silu',
           windows='all'),
    Family('mixtral', 'MixtralForCausalLM', norm_plus_one=False, activation='silu', moe=True,
           windows='all'),
    Family('gemma', 'GemmaForCausalLM', norm_plus_one=True, activation='gelu_tanh',
           embed_scale=True),
    Family('gemma2', 'Gemma2ForCausalLM', norm_plus_one=True, activation='gelu_tanh',
           embed_scale=True, post_norms=True, softcaps=True, query_scalar=True,
           windows='pattern'),
    Family('gemma3_text', 'Gemma3ForCausalLM', norm_plus_one=True, activation='gelu_tanh',
           embed_scale=True, post_norms=True, qk_norm=True, query_scalar=True,
           local_rope=True, windows='pattern'),
)}

_ACTIVATIONS = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_tanh': 'gelu_tanh',
                # Gemma 1 configs say 'gelu' but its reference code uses the
                # tanh approximation (Hugging Face overrides it the same way).
                'gelu': 'gelu_tanh'}


def family_of(hf: dict, where: str) -> Family:
  model_type = hf.get('model_type')
  if model_type not in FAMILIES:
    raise ConfigError(f'{where}: model_type {model_type!r} is not supported; gemjax.convert '
                      f'reads {sorted(FAMILIES)}')
  return FAMILIES[model_type]


def _rope_params(hf: dict, layer_type: str | None = None) -> dict:
  """{'rope_theta', 'rope_type', ...} in both config styles (transformers 5's
  rope_parameters, per layer type for Gemma 3, or the older top-level keys)."""
  p = hf.get('rope_parameters')
  if isinstance(p, dict) and layer_type and layer_type in p:
    p = p[layer_type]
  if not isinstance(p, dict) or 'rope_theta' not in p:
    p = dict(hf.get('rope_scaling') or {})
    p.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
    if layer_type == 'sliding_attention' and 'rope_local_base_freq' in hf:
      p = {'rope_theta': hf['rope_local_base_freq'], 'rope_type': 'default'}
  p = dict(p)
  p.setdefault('rope_type', p.get('type', 'default'))
  return p


def _rope_scaling(p: dict, where: str) -> dict:
  kind = p['rope_type']
  if kind == 'default':
    return {'kind': 'none'}
  if kind == 'linear':
    return {'kind': 'linear', 'factor': float(p['factor'])}
  if kind == 'llama3':
    return {'kind': 'llama3', 'factor': float(p['factor']),
            'low_freq_factor': float(p['low_freq_factor']),
            'high_freq_factor': float(p['high_freq_factor']),
            'original_max_len': int(p['original_max_position_embeddings'])}
  raise ConfigError(f"{where}: rope_type {kind!r} is not supported (gemjax reads 'default', "
                    "'linear' and 'llama3')")


def _layer_pattern(hf: dict, n: int, where: str) -> tuple[int, int]:
  """(model.local_layers, model.window) from layer_types / sliding_window."""
  window = hf.get('sliding_window') or 0
  types = hf.get('layer_types')
  if types is None:
    if hf.get('model_type') == 'gemma2':
      types = ['sliding_attention' if i % 2 == 0 else 'full_attention' for i in range(n)]
    elif hf.get('model_type') == 'gemma3_text':
      k = hf.get('sliding_window_pattern') or hf.get('_sliding_window_pattern') or 6
      types = ['full_attention' if (i + 1) % k == 0 else 'sliding_attention'
               for i in range(n)]
    else:
      types = ['sliding_attention' if window else 'full_attention'] * n
  if len(types) != n or set(types) - {'sliding_attention', 'full_attention'}:
    raise ConfigError(f'{where}: layer_types must list {n} entries of sliding_attention / '
                      f'full_attention, got {types}')
  sliding = [t == 'sliding_attention' for t in types]
  if not any(sliding):
    return 0, 0
  if not window:
    raise ConfigError(f'{where}: sliding_attention layers but no sliding_window')
  if all(sliding):
    return -1, int(window)
  local = sliding.index(False)
  period = [True] * local + [False]
  # Whole repeats, then possibly the start of one more (Gemma 3 1B: 26 layers
  # of period 6 end with two sliding layers; gemjax runs them as its tail).
  if sliding != (period * (n // (local + 1) + 1))[:n]:
    raise ConfigError(
        f'{where}: the layer pattern {["S" if s else "F" for s in sliding]} is not whole '
        f'repeats of {local} sliding layer(s) then a full one (plus the start of one '
        'more), which gemjax needs to scan its layers')
  return local, int(window)


def model_config(hf: dict, where: str) -> dict:
  """The `model:` section (a dict of ModelConfig fields) of an HF config.json."""
  fam = family_of(hf, where)

  def need(key):
    if key not in hf or hf[key] is None:
      raise ConfigError(f'{where}: config.json has no {key!r}')
    return hf[key]

  for bias in ('attention_bias', 'mlp_bias'):
    if hf.get(bias):
      raise ConfigError(f'{where}: {bias}=true is not supported (gemjax projections have '
                        'no biases)')
  act = hf.get('hidden_activation') or hf.get('hidden_act') or 'silu'
  if _ACTIVATIONS.get(act) != fam.activation:
    raise ConfigError(f'{where}: hidden activation {act!r} is not {fam.model_type}\'s '
                      f'{fam.activation!r}')
  d, heads = int(need('hidden_size')), int(need('num_attention_heads'))
  n = int(need('num_hidden_layers'))
  m: dict[str, Any] = dict(
      vocab_size=int(need('vocab_size')), d_model=d, num_layers=n, num_heads=heads,
      num_kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=int(hf.get('head_dim') or d // heads), mlp_dim=int(need('intermediate_size')),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', fam.model_type.startswith('gemma'))),
      qk_norm=fam.qk_norm, norm_plus_one=fam.norm_plus_one, mlp_activation=fam.activation,
      embed_scale=fam.embed_scale, post_norms=fam.post_norms,
      # A text model: no patch embedders until fine-tuning adds them.
      image_patch_dim=0, audio_patch_dim=0, video_patch_dim=0)
  local, window = _layer_pattern(hf, n, where)
  m.update(local_layers=local, window=window)
  global_rope = _rope_params(hf, 'full_attention' if fam.local_rope else None)
  m['rope_base'] = float(global_rope['rope_theta'])
  m['rope_scaling'] = _rope_scaling(global_rope, where)
  if fam.local_rope and local:
    local_rope = _rope_params(hf, 'sliding_attention')
    if local_rope['rope_type'] != 'default':
      raise ConfigError(f'{where}: scaled RoPE on sliding layers is not supported')
    m['local_rope_base'] = float(local_rope['rope_theta'])
  if fam.softcaps:
    m['attn_softcap'] = float(hf.get('attn_logit_softcapping') or 0.0)
    m['final_softcap'] = float(hf.get('final_logit_softcapping') or 0.0)
  if fam.query_scalar:
    m['query_scale'] = float(need('query_pre_attn_scalar')) ** -0.5
  if fam.moe:
    e, k = int(need('num_local_experts')), int(need('num_experts_per_tok'))
    # Capacity for every token: the imported model computes what it computed
    # before (lower it for training throughput, accepting drops).
    m['moe'] = dict(num_experts=e, top_k=k, expert_dim=m['mlp_dim'], renormalize=True,
                    capacity_factor=float(e) / k)
  return m


def hf_config(m: ModelConfig, fam: Family, base: dict | None = None) -> dict:
  """A config.json for a gemjax model of family `fam` (starting from the
  source model's own config.json, when the checkpoint kept it)."""
  out = dict(base or {})
  out.update(
      architectures=[fam.architecture], model_type=fam.model_type,
      vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
      head_dim=m.head_dim, intermediate_size=m.mlp_dim, rms_norm_eps=m.norm_eps,
      tie_word_embeddings=m.tie_embeddings)
  out.setdefault('max_position_embeddings', 8192)
  act = 'gelu_pytorch_tanh' if fam.activation == 'gelu_tanh' else 'silu'
  out['hidden_act'] = act
  if fam.model_type.startswith('gemma'):
    out['hidden_activation'] = act
  rope = {'rope_theta': m.rope_base, 'rope_type': 'default'}
  r = m.rope_scaling
  if r.kind == 'linear':
    rope.update(rope_type='linear', factor=r.factor)
  elif r.kind == 'llama3':
    rope.update(rope_type='llama3', factor=r.factor, low_freq_factor=r.low_freq_factor,
                high_freq_factor=r.high_freq_factor,
                original_max_position_embeddings=r.original_max_len)
  if m.local_layers:
    n_local = m.num_layers if m.local_layers < 0 else m.local_layers
    period = ['sliding_attention'] * n_local + ([] if m.local_layers < 0 else ['full_attention'])
    out['layer_types'] = (period * m.num_layers)[:m.num_layers]
    out['sliding_window'] = m.window
  else:
    if fam.model_type in ('gemma2', 'gemma3_text'):
      out['layer_types'] = ['full_attention'] * m.num_layers
    out['sliding_window'] = None
  if fam.local_rope:
    local = {'rope_theta': m.local_rope_base or m.rope_base, 'rope_type': 'default'}
    out['rope_parameters'] = {'full_attention': rope, 'sliding_attention': local}
    out['rope_local_base_freq'] = local['rope_theta']
  else:
    out['rope_parameters'] = rope
  out['rope_theta'] = m.rope_base
  out.pop('rope_scaling', None)
  if fam.softcaps:
    out['attn_logit_softcapping'] = m.attn_softcap or None
    out['final_logit_softcapping'] = m.final_softcap or None
  if fam.query_scalar:
    out['query_pre_attn_scalar'] = (m.query_scale ** -2 if m.query_scale else m.head_dim)
    if float(out['query_pre_attn_scalar']).is_integer():
      out['query_pre_attn_scalar'] = int(round(out['query_pre_attn_scalar']))
  if fam.moe:
    out.update(num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
               intermediate_size=m.moe.expert_dim or m.mlp_dim)
  out.setdefault('attention_bias', False)
  return out


def family_for_export(m: ModelConfig, source_type: str | None, where: str) -> Family:
  """The family a gemjax model exports as: the one it was imported from,
  else the only one whose architecture it has."""
  if source_type:
    fam = FAMILIES.get(source_type)
    if fam is None:
      raise ConfigError(f'{where}: unknown source model_type {source_type!r}')
  else:
    candidates = [f for f in FAMILIES.values() if _matches(m, f)]
    if not candidates:
      raise ConfigError(
          f"{where}: this model's architecture has no Hugging Face family gemjax exports "
          f'(norm_plus_one={m.norm_plus_one}, mlp_activation={m.mlp_activation!r}, '
          f'qk_norm={m.qk_norm}, post_norms={m.post_norms}, embed_scale={m.embed_scale}); '
          f'families: {sorted(FAMILIES)}')
    fam = candidates[0]
  if not _matches(m, fam):
    raise ConfigError(f'{where}: the model no longer has the {fam.model_type} architecture '
                      '(its norm / activation / QK-norm / MoE options changed)')
  return fam


def _matches(m: ModelConfig, fam: Family) -> bool:
  return (m.norm_plus_one == fam.norm_plus_one and m.mlp_activation == fam.activation
          and m.embed_scale == fam.embed_scale and m.post_norms == fam.post_norms
          and m.qk_norm == fam.qk_norm and bool(m.moe.num_experts) == fam.moe
          and (fam.softcaps or not (m.attn_softcap or m.final_softcap))
          and m.encoder_layers == 0 and m.moe.shared_experts == 0
          and (not m.moe.num_experts or m.moe.moe_every == 1)
          and _window_ok(fam, m.local_layers))


def _window_ok(fam: Family, local_layers: int) -> bool:
  """Whether the family expresses model.local_layers (0: no window, -1: all
  layers slide, n > 0: n sliding layers then a global one)."""
  return {'none': local_layers == 0, 'all': local_layers in (0, -1),
          'pattern': local_layers >= -1}[fam.windows]


# ------------------------------------------------------------------ tensors


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One gemjax parameter and the HF tensor(s) it is made of.

  `path`: keys in the parameter tree. `hf`: HF name template ({i}: layer,
  {e}: expert). `to_gemjax(t, dims)` / `to_hf(a, dims)` convert one layer's
  (one expert's) tensor. Per-layer leaves are stacked over layer groups
  (and experts) by the caller.
  """
  path: tuple
  hf: str
  to_gemjax: Callable
  to_hf: Callable
  per_layer: bool = True
  per_expert: bool = False
  tail: bool = False        # in the unscanned tail (no group axis)


def _linear(shape_of):
  """HF nn.Linear weight [out, in] <-> gemjax [in, ...out dims]."""
  return (lambda t, d: t.T.reshape(shape_of(d)),
          lambda a, d: a.reshape(a.shape[0], -1).T if a.ndim > 1 else a)


def _out_proj():
  """o_proj [D, H*K] <-> wo [H, K, D]."""
  return (lambda t, d: t.T.reshape(d['H'], d['K'], d['D']),
          lambda a, d: a.reshape(d['H'] * d['K'], d['D']).T)


_same = (lambda t, d: t, lambda a, d: a)
_transpose = (lambda t, d: t.T, lambda a, d: a.T)


def leaves(m: ModelConfig, fam: Family, period: int) -> list[Leaf]:
  """Every parameter of a text model of this family, with its HF name."""
  out = [Leaf(('embedding_VxD',), 'model.embed_tokens.weight', *_same, per_layer=False),
         Leaf(('final_norm', 'scale'), 'model.norm.weight', *_same, per_layer=False)]
  if not m.tie_embeddings:
    out.append(Leaf(('head_DxV',), 'lm_head.weight', *_transpose, per_layer=False))
  attn = 'model.layers.{i}.self_attn.'
  block = []
  block += [
      (('attn', 'wq_DxHxK'), attn + 'q_proj.weight', *_linear(lambda d: (d['D'], d['H'], d['K']))),
      (('attn', 'wk_DxGxK'), attn + 'k_proj.weight', *_linear(lambda d: (d['D'], d['G'], d['K']))),
      (('attn', 'wv_DxGxK'), attn + 'v_proj.weight', *_linear(lambda d: (d['D'], d['G'], d['K']))),
      (('attn', 'wo_HxKxD'), attn + 'o_proj.weight', *_out_proj()),
      (('attn_norm', 'scale'), 'model.layers.{i}.input_layernorm.weight', *_same)]
  if fam.qk_norm:
    block += [(('attn', 'q_norm', 'scale'), attn + 'q_norm.weight', *_same),
              (('attn', 'k_norm', 'scale'), attn + 'k_norm.weight', *_same)]
  if fam.post_norms:
    block += [
        (('attn_post_norm', 'scale'), 'model.layers.{i}.post_attention_layernorm.weight', *_same),
        (('mlp_norm', 'scale'), 'model.layers.{i}.pre_feedforward_layernorm.weight', *_same),
        (('mlp_post_norm', 'scale'), 'model.layers.{i}.post_feedforward_layernorm.weight',
         *_same)]
  else:
    block += [(('mlp_norm', 'scale'), 'model.layers.{i}.post_attention_layernorm.weight',
               *_same)]
  expert = []
  if fam.moe:
    moe = 'model.layers.{i}.block_sparse_moe.'
    block += [(('mlp', 'router_DxE'), moe + 'gate.weight', *_transpose)]
    expert += [(('mlp', 'w_gate_ExDxF'), moe + 'experts.{e}.w1.weight', *_transpose),
               (('mlp', 'w_up_ExDxF'), moe + 'experts.{e}.w3.weight', *_transpose),
               (('mlp', 'w_down_ExFxD'), moe + 'experts.{e}.w2.weight', *_transpose)]
  else:
    mlp = 'model.layers.{i}.mlp.'
    block += [(('mlp', 'w_gate_DxF'), mlp + 'gate_proj.weight', *_transpose),
              (('mlp', 'w_up_DxF'), mlp + 'up_proj.weight', *_transpose),
              (('mlp', 'w_down_FxD'), mlp + 'down_proj.weight', *_transpose)]
  for b in range(period):
    for sub, name, fwd, bwd in block:
      out.append(Leaf(('layers', 'blocks', b) + sub, name, fwd, bwd))
    for sub, name, fwd, bwd in expert:
      out.append(Leaf(('layers', 'blocks', b) + sub, name, fwd, bwd, per_expert=True))
  for b in range(m.num_layers % period):
    for sub, name, fwd, bwd in block:
      out.append(Leaf(('tail', 'blocks', b) + sub, name, fwd, bwd, tail=True))
  return out


def dims(m: ModelConfig) -> Dims:
  return {'D': m.d_model, 'H': m.num_heads, 'G': m.num_kv_heads, 'K': m.head_dim,
          'E': m.moe.num_experts}


def check_model(m: ModelConfig, where: str) -> None:
  """What a converted model must not have (gemjax-only parts)."""
  if m.encoder_layers:
    raise ConfigError(f'{where}: late-fusion encoders (model.encoder_layers) have no '
                      'Hugging Face equivalent')
  if m.attention == 'infini':
    raise ConfigError(f"{where}: model.attention='infini' has no Hugging Face equivalent")


def known_hf_names(m: ModelConfig, fam: Family, period: int) -> set[str]:
  names = set()
  whole = m.num_layers // period * period
  for leaf in leaves(m, fam, period):
    if leaf.tail:
      layers = [whole + leaf.path[2]]
    elif leaf.per_layer:
      layers = [i for i in range(whole) if i % period == leaf.path[2]]
    else:
      layers = [None]
    experts = range(m.moe.num_experts) if leaf.per_expert else [None]
    for i in layers:
      for e in experts:
        names.add(leaf.hf.format(i=i, e=e))
  return names


__all__ = ['FAMILIES', 'Family', 'Leaf', 'check_model', 'dims', 'family_for_export',
           'family_of', 'hf_config', 'known_hf_names', 'leaves', 'model_config']
