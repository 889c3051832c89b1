"""Model FLOPs per token, counted once from the model's spec, for MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B): a training step costs
6 FLOPs per matmul parameter per token (2 forward, 4 backward) plus the
attention score and value matmuls, 12 * layers * heads * head_dim * T per token
with no discount for the causal mask ("full"). With `causal_half=True` the
causal mask is discounted, counting half the T x T square (T/2 keys per
query; the convention MaxText and most recent papers report): both are
logged (`mfu`, `mfu_causal`), and every table says which it shows.
The input embedding lookup is a gather, not a matmul, so an untied input table
is not counted; the output head is. For MoE only the *active* expert
parameters count. Every number is read off a `DecoderSpec` (per block: its
attention and feed-forward spec), so a new sublayer kind counts itself.
"""

from __future__ import annotations

from gemjax.model.decoder import DecoderSpec


def matmul_params_per_token(spec: DecoderSpec) -> int:
  """Active parameters that take part in a matmul for each token."""
  blocks = sum(b.attention.matmul_params + b.mlp.matmul_params for b in spec.blocks)
  return blocks + spec.d_model * spec.vocab_size


def num_moe_layers(spec: DecoderSpec) -> int:
  """How many of the layers have an MoE feed-forward."""
  return sum(b.is_moe for b in spec.blocks)


def attention_flops_per_token(spec: DecoderSpec, seq_len: int, *,
                              causal_half: bool = False) -> float:
  """Score + value matmuls: 12 * heads * head_dim per (query, key) pair, over
  the keys each layer's spec says a query covers (`keys_per_query`): T for
  global attention, min(window, T) for a sliding-window layer, the segment
  (min(segment_len, T), windowed if set) for Infini-attention. With
  `causal_half`, causal layers count only the visible half of that band
  (`causal_keys_per_query`). Infini's memory read/write (K x K per head and
  token, independent of T) is not a score matmul and is not counted, like
  other non-parameter matmuls. An int without `causal_half`."""
  total = 0
  for b in spec.blocks:
    keys = (b.attention.causal_keys_per_query(seq_len) if causal_half
            else b.attention.keys_per_query(seq_len))
    total += 12 * b.attention.score_width * keys
  return total


def train_flops_per_token(spec: DecoderSpec, seq_len: int, *,
                          causal_half: bool = False) -> float:
  return 6 * matmul_params_per_token(spec) + attention_flops_per_token(
      spec, seq_len, causal_half=causal_half)


def train_flops_per_step(spec: DecoderSpec, batch_size: int, seq_len: int, *,
                         causal_half: bool = False) -> float:
  return train_flops_per_token(spec, seq_len, causal_half=causal_half) * batch_size * seq_len
