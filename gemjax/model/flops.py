"""Model FLOPs per token, counted once, for MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B): a training step costs
6 FLOPs per matmul parameter per token (2 forward, 4 backward) plus the
attention score and value matmuls, 12 * layers * heads * head_dim * T per token
(no discount for the causal mask: that is how published MFU numbers count it).
The input embedding lookup is a gather, not a matmul, so an untied input table
is not counted; the output head is. For MoE only the *active* expert
parameters count.
"""

from __future__ import annotations


def matmul_params_per_token(cfg) -> int:
  """Active parameters that take part in a matmul for each token."""
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attn = d * h * k + 2 * d * g * k + h * k * d
  mlp = 3 * d * f
  head = d * cfg.vocab_size
  moe_layers = num_moe_layers(cfg)
  m = cfg.moe
  # An MoE layer: the router, then top_k routed + the shared SwiGLU experts.
  moe = d * m.num_experts + (m.top_k + m.shared_experts) * 3 * d * (m.expert_dim or f)
  return (cfg.num_layers * attn + (cfg.num_layers - moe_layers) * mlp
          + moe_layers * moe + head)


def num_moe_layers(cfg) -> int:
  """How many of the layers have an MoE feed-forward (per `registry.layer_plan`)."""
  if not cfg.moe.num_experts:
    return 0
  from gemjax.model import registry  # late: registry imports the model modules
  plan = registry.layer_plan(cfg)
  return sum(s.mlp == 'moe' for s in plan) * (cfg.num_layers // len(plan))


def attention_flops_per_token(cfg, seq_len: int) -> int:
  """Score + value matmuls. A sliding-window (local) layer attends to at most
  `window` keys per query, so it counts min(window, seq_len) instead of T."""
  local = cfg.num_layers // (cfg.local_layers + 1) * cfg.local_layers if cfg.local_layers else 0
  context = local * min(cfg.window, seq_len) + (cfg.num_layers - local) * seq_len
  return 12 * cfg.num_heads * cfg.head_dim * context


def train_flops_per_token(cfg, seq_len: int) -> int:
  return 6 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len)


def train_flops_per_step(cfg, batch_size: int, seq_len: int) -> int:
  return train_flops_per_token(cfg, seq_len) * batch_size * seq_len
