"""Sparse Mixture-of-Experts feed-forward: a router and E SwiGLU experts.

    probs = softmax(x W_r)              router in float32 (ST-MoE, Zoph et al. 2022)
    top-k experts per token             ties -> the lower expert index (lax.top_k's order)
    y = sum_k gate_k * SwiGLU_{e_k}(x)  (+ shared experts, always on)

The router decides where tokens go; moving them (capacity buffers or sorted
groups, all_to_all over the `expert` mesh axis) is `gemjax.parallel.expert`'s
job, so this module only calls `expert.dispatch_combine`.

Like every feed-forward sublayer it returns `(y_BxTxD, aux)`:

  moe_lb_loss           load balance, Switch (Fedus et al. 2021, eq. 4):
                        coef * E * sum_e f_e * P_e, f_e the fraction of routed
                        assignments that chose e, P_e the mean router prob of e
  moe_z_loss            router z-loss (ST-MoE eq. 5): coef * mean(logsumexp^2)
  moe_load              [E] fraction of assignments per expert (sums to 1)
  moe_load_by_modality  [M, E] the same per modality of the token (a row of
                        zeros for a modality absent from the batch)
  moe_dropped           fraction of assignments dropped: for capacity, or by
                        a bounded dropless receive buffer
                        (`dropless_buffer_factor` > 0, expert parallel only)

Padding tokens (segment id 0) are not routed: they take no expert capacity,
and count in no loss or metric.

Capacity path (`path='capacity'`, what 'auto' picks): outputs depend
on how tokens are grouped, not only on the tokens. A group is a row, or with
the sequence split over `mesh.context` each device's chunk of the row, so
changing `mesh.context` (or `mesh.context_layout`, which changes the chunks)
changes which assignments overflow and drop, and hence the outputs and the
loss. Within a group the GShard priority (all first choices before any
second choice) also lets a later token's first choice displace an earlier
token's second choice, so capacity MoE is not strictly causal. The dropless
path drops nothing and depends on neither, unless `dropless_buffer_factor` > 0
bounds its expert-parallel receive buffer (gemjax/parallel/expert.py): then
overflow on a shard drops, what drops depends on how the batch is split over
devices, and `moe_dropped` shows it.

Imports jax, flax, gemjax.model.{layers, mlp, registry}, gemjax.parallel and
gemjax.batch (the modality names).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.batch import MODALITY_NAMES
from gemjax.model.info import SequenceInfo
from gemjax.model.mlp import SwiGLU
from gemjax.model.params import dtype, fan_in_std, param
from gemjax.parallel import expert as expert_lib
from gemjax.parallel.sharding import constrain

_W_IN_NAMES = ('experts', 'expert_embed', 'mlp')
_W_OUT_NAMES = ('experts', 'mlp', 'expert_embed')


# -------------------------------------------------------------------- routing


def top_k_routing(logits_BxTxE: jax.Array, top_k: int, *, renormalize: bool):
  """(expert_BxTxK int32, gate_BxTxK f32, probs_BxTxE f32).

  Selection on the float32 logits (not the rounded probabilities), so equal
  probabilities with different logits still order correctly; exact ties go to
  the lower expert index, the documented order of `lax.top_k` (which
  `top_k_masks` reproduces without a sort).
  """
  logits = logits_BxTxE.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  pick_BxTxKxE = top_k_masks(logits, top_k)
  e_E = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  expert = expert_lib.sum_last(jnp.where(pick_BxTxKxE, e_E, 0))
  gate = expert_lib.sum_last(jnp.where(pick_BxTxKxE, probs[..., None, :], 0.0))
  if renormalize:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  return expert, gate, probs


def top_k_masks(logits_BxTxE: jax.Array, k: int) -> jax.Array:
  """[B, T, K, E] one-hot masks of the k largest logits, in `lax.top_k`'s
  order (descending, equal values by lower index), from ranks: the rank of
  expert e is how many experts beat it. Elementwise work over E^2 pairs per
  token instead of a sort: the partitioner splits it over any token sharding
  (it all-gathers the logits for `lax.top_k`), and E is small."""
  E = logits_BxTxE.shape[-1]
  e_E = jnp.arange(E)
  l_i, l_j = logits_BxTxE[..., :, None], logits_BxTxE[..., None, :]
  beats_BxTxExE = (l_j > l_i) | ((l_j == l_i) & (e_E[None, :] < e_E[:, None]))  # j beats i
  rank_BxTxE = expert_lib.sum_last(beats_BxTxExE.astype(jnp.int32))
  return rank_BxTxE[..., None, :] == jnp.arange(k)[:, None]


def expert_load(expert_BxTxK: jax.Array, valid_BxT: jax.Array, num_experts: int) -> jax.Array:
  """[B, T, E] number of assignments (0 or 1) of each valid token to each expert."""
  onehot = sum(jax.nn.one_hot(expert_BxTxK[..., k], num_experts, dtype=jnp.float32)
               for k in range(expert_BxTxK.shape[-1]))  # K adds: no reduction kernel
  return onehot * valid_BxT[..., None].astype(jnp.float32)


def load_balance_loss(probs_BxTxE: jax.Array, expert_BxTxK: jax.Array,
                      valid_BxT: jax.Array) -> jax.Array:
  """E * sum_e f_e * P_e (Fedus et al. 2021), over valid tokens; 1 when uniform.

  f_e counts top-k assignments (sum_e f_e = 1), so the loss is k-independent;
  it gets gradients only through P_e (f is a count).
  """
  E, K = probs_BxTxE.shape[-1], expert_BxTxK.shape[-1]
  v = valid_BxT.astype(jnp.float32)
  n = jnp.maximum(v.sum(), 1.0)
  f_E = expert_load(expert_BxTxK, valid_BxT, E).sum(axis=(0, 1)) / (n * K)
  p_E = jnp.einsum('bte,bt->e', probs_BxTxE.astype(jnp.float32), v) / n
  return E * jnp.sum(f_E * p_E)


def router_z_loss(logits_BxTxE: jax.Array, valid_BxT: jax.Array) -> jax.Array:
  """mean over valid tokens of logsumexp(logits)^2 (Zoph et al. 2022)."""
  v = valid_BxT.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits_BxTxE.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(lse) * v) / jnp.maximum(v.sum(), 1.0)


# -------------------------------------------------------------------- experts


@jax.custom_vjp
def swiglu_act(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, with a hand-written VJP that recomputes the sigmoid.

  Autodiff keeps sigmoid(gate) and silu(gate) as residuals and runs the
  backward as separate elementwise passes over the [E, M, F] activations
  (five in all on XLA:CPU); this is one pass forward and one backward.
  """
  return jax.nn.silu(gate) * up


def _swiglu_act_fwd(gate, up):
  return swiglu_act(gate, up), (gate, up)


def _swiglu_act_bwd(res, dh):
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  # d silu / d gate = sig + gate * sig * (1 - sig)
  return dh * up * (sig + silu * (1 - sig)), dh * silu


swiglu_act.defvjp(_swiglu_act_fwd, _swiglu_act_bwd)


def _swiglu_batched(w, x_ExMxD):
  w_gate, w_up, w_down = w
  gate = jnp.einsum('emd,edf->emf', x_ExMxD, w_gate)
  up = jnp.einsum('emd,edf->emf', x_ExMxD, w_up)
  return jnp.einsum('emf,efd->emd', swiglu_act(gate, up), w_down)


def _swiglu_grouped(w, x_MxD, sizes_E):
  w_gate, w_up, w_down = w
  gate = jax.lax.ragged_dot(x_MxD, w_gate, sizes_E)
  up = jax.lax.ragged_dot(x_MxD, w_up, sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, sizes_E)


SWIGLU_EXPERTS = expert_lib.ExpertFns(batched=_swiglu_batched, grouped=_swiglu_grouped)


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts (+ optional shared experts)."""

  def __init__(self, d_model: int, expert_dim: int, num_experts: int, top_k: int, *,
               shared_dim: int = 0, renormalize: bool = True,
               capacity_factor: float = 1.25, path: str = 'auto',
               dropless_buffer_factor: float = 0.0, router_z_loss: float = 1e-3,
               load_balance_loss: float = 1e-2,
               num_modalities: int = len(MODALITY_NAMES), compute_dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not 1 <= top_k <= num_experts:
      raise ValueError(f'top_k={top_k} must be in [1, num_experts={num_experts}]')
    expert_lib.resolve_path(path)  # fail at build time on a bad name
    if dropless_buffer_factor < 0:
      raise ValueError(f'dropless_buffer_factor={dropless_buffer_factor} must be >= 0 '
                       '(0 = worst-case receive buffer)')
    self.num_experts, self.top_k = num_experts, top_k
    self.renormalize, self.capacity_factor, self.path = renormalize, capacity_factor, path
    self.dropless_buffer_factor = dropless_buffer_factor
    self.z_coef, self.lb_coef = router_z_loss, load_balance_loss
    self.num_modalities = num_modalities
    self.compute_dtype = compute_dtype
    E, D, F = num_experts, d_model, expert_dim
    self.router_DxE = param(rngs, (D, E), ('embed', None), std=fan_in_std(D), dtype=param_dtype)
    self.w_gate_ExDxF = param(rngs, (E, D, F), _W_IN_NAMES, std=fan_in_std(D), dtype=param_dtype)
    self.w_up_ExDxF = param(rngs, (E, D, F), _W_IN_NAMES, std=fan_in_std(D), dtype=param_dtype)
    self.w_down_ExFxD = param(rngs, (E, F, D), _W_OUT_NAMES, std=fan_in_std(F), dtype=param_dtype)
    # n shared experts of width F are one SwiGLU of width n * F.
    self.shared = (SwiGLU(D, shared_dim, compute_dtype=compute_dtype,
                          param_dtype=param_dtype, rngs=rngs) if shared_dim else None)

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo | None = None, *,
               no_drop: bool = False):
    """`no_drop` (decoding): room for every token, C = T on the capacity
    path and the worst-case dropless receive buffer."""
    B, T, _ = x_BxTxD.shape
    E, cd = self.num_experts, self.compute_dtype
    # Flattened tokens: one 2-D matmul (see params.project), router in f32.
    logits_BxTxE = jnp.dot(x_BxTxD.reshape(B * T, -1).astype(jnp.float32),
                           self.router_DxE[...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST).reshape(B, T, E)
    logits_BxTxE = constrain(logits_BxTxE, ('batch', 'length', None))
    expert_BxTxK, gate_BxTxK, probs_BxTxE = top_k_routing(
        logits_BxTxE, self.top_k, renormalize=self.renormalize)
    if info is None:
      valid_BxT = jnp.ones((B, T), bool)
      modality_BxT = jnp.zeros((B, T), jnp.int32)
    else:
      valid_BxT = info.segment_ids_BxT > 0
      modality_BxT = info.modality_BxT.astype(jnp.int32)

    weights = tuple(w[...].astype(cd) for w in
                    (self.w_gate_ExDxF, self.w_up_ExDxF, self.w_down_ExFxD))
    y_BxTxD, kept_BxTxK = expert_lib.dispatch_combine(
        x_BxTxD.astype(cd), expert_BxTxK, gate_BxTxK, valid_BxT, weights,
        (_W_IN_NAMES, _W_IN_NAMES, _W_OUT_NAMES), SWIGLU_EXPERTS,
        num_experts=E, path=self.path,
        capacity_factor=E / self.top_k if no_drop else self.capacity_factor,
        dropless_buffer_factor=0.0 if no_drop else self.dropless_buffer_factor)
    if self.shared is not None:
      y_BxTxD = y_BxTxD + self.shared(x_BxTxD, info)[0].astype(y_BxTxD.dtype)
    y_BxTxD = constrain(y_BxTxD, ('batch', 'length', 'act_embed'))
    return y_BxTxD, self._aux(logits_BxTxE, probs_BxTxE, expert_BxTxK, kept_BxTxK,
                              valid_BxT, modality_BxT)

  def _aux(self, logits, probs, expert, kept, valid, modality) -> dict[str, jax.Array]:
    E, K, M = self.num_experts, self.top_k, self.num_modalities
    v = valid.astype(jnp.float32)
    n_assign = jnp.maximum(v.sum() * K, 1.0)
    load_BxTxE = expert_load(expert, valid, E)
    mod_BxTxM = jax.nn.one_hot(modality, M, dtype=jnp.float32) * v[..., None]
    per_mod_MxE = jnp.einsum('btm,bte->me', mod_BxTxM, load_BxTxE)
    dropped = jnp.sum((valid[..., None] & ~kept).astype(jnp.float32))
    return {
        'moe_lb_loss': self.lb_coef * load_balance_loss(probs, expert, valid),
        'moe_z_loss': self.z_coef * router_z_loss(logits, valid),
        'moe_load': load_BxTxE.sum(axis=(0, 1)) / n_assign,
        'moe_load_by_modality': per_mod_MxE / jnp.maximum(per_mod_MxE.sum(-1, keepdims=True), 1.0),
        'moe_dropped': dropped / n_assign,
    }


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """A routed MoE feed-forward: `num_experts` SwiGLU experts of `expert_dim`."""
  d_model: int
  expert_dim: int
  num_experts: int
  top_k: int = 2
  shared_dim: int = 0
  renormalize: bool = True
  capacity_factor: float = 1.25
  path: str = 'auto'
  dropless_buffer_factor: float = 0.0
  router_z_loss: float = 1e-3
  load_balance_loss: float = 1e-2
  compute_dtype: str = 'float32'
  param_dtype: str = 'float32'

  def build(self, rngs: nnx.Rngs) -> 'MoE':
    return MoE(self.d_model, self.expert_dim, self.num_experts, self.top_k,
               shared_dim=self.shared_dim, renormalize=self.renormalize,
               capacity_factor=self.capacity_factor, path=self.path,
               dropless_buffer_factor=self.dropless_buffer_factor,
               router_z_loss=self.router_z_loss, load_balance_loss=self.load_balance_loss,
               compute_dtype=dtype(self.compute_dtype), param_dtype=dtype(self.param_dtype),
               rngs=rngs)

  @property
  def matmul_params(self) -> int:
    """Active per token: the router, then top_k routed + the shared experts."""
    d = self.d_model
    return d * self.num_experts + (self.top_k * 3 * d * self.expert_dim + 3 * d * self.shared_dim)
