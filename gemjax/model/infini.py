"""Infini-attention (Munkhdalai, Faruqui & Gopal 2024, "Leave No Context Behind").

The sequence is processed in segments of `segment_len` tokens (a `lax.scan`).
Inside a segment, ordinary masked softmax attention (`A_dot`, any registered
kernel, RoPE applied). Across segments, a compressive memory per layer and
per KV head: a K x K matrix M and a normaliser z, read and written with the
un-rotated q/k (the paper's retrieval is position-free, so RoPE stays out of
the memory):

    sigma(x)  = ELU(x) + 1                                          (eq. 3)
    A_mem     = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1} + eps)         (eq. 3)
    linear:  M_s = M_{s-1} + sigma(K)^T V                           (eq. 4)
    delta:   M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} /
                                          (sigma(K) z_{s-1} + eps))  (eq. 5)
             z_s = z_{s-1} + sum_t sigma(K_t)
    A         = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot     (eq. 6)

with a learned gate beta per query head. `eps` keeps the first segment
(M = 0, z = 0) at A_mem = 0 instead of 0/0 = NaN. GQA: the memory lives per
KV head and every query head of the group reads it (per head when G = H).

Packed rows: memory never crosses documents. It is tagged with the segment
id it holds; a query reads it only if its own id matches, and before a
write the memory is cleared if the document changed. A document that starts
mid-segment therefore sees earlier segments of itself only (exact for the
contiguous documents the packer makes). Bidirectional blocks are honoured
inside a segment only. Ring layouts and context sharding do not apply: the
scan walks the row in order.

The gate `memory_gate` carries its own learning-rate multiplier and no
weight decay as parameter metadata (`gemjax.model.params`), which the
optimizer reads. Imports the attention module and the model's building blocks.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.model.attention import Attention, AttentionSpec
from gemjax.model.info import SequenceInfo
from gemjax.model.params import LR_MULT, WEIGHT_DECAY, constant, dtype
from gemjax.model.rope import apply_rope
from gemjax.parallel.sharding import constrain

UPDATES = ('linear', 'delta')
MEMORY_EPS = 1e-6


def elu_plus_one(x: jax.Array) -> jax.Array:
  return jax.nn.elu(x) + 1.0


class Memory(NamedTuple):
  """Compressive memory of one layer: M [B, G, K, K], z [B, G, K], doc [B]."""
  M: jax.Array
  z: jax.Array
  doc: jax.Array


def memory_read(sq_BxLxGxRxK: jax.Array, mem: Memory) -> jax.Array:
  """A_mem = sigma(q) M / (sigma(q) z + eps): [B, L, G, R, K] float32."""
  num = jnp.einsum('blgrk,bgkv->blgrv', sq_BxLxGxRxK, mem.M)
  den = jnp.einsum('blgrk,bgk->blgr', sq_BxLxGxRxK, mem.z)
  return num / (den[..., None] + MEMORY_EPS)


def memory_write(mem: Memory, sk_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                 seg_BxL: jax.Array, *, update: str) -> Memory:
  """Adds one segment's keys/values (only the document that continues)."""
  last = seg_BxL[:, -1]
  keep = (mem.doc == last).astype(jnp.float32)
  M = mem.M * keep[:, None, None, None]
  z = mem.z * keep[:, None, None]
  w_BxL = (seg_BxL == last[:, None]).astype(jnp.float32)
  sk = sk_BxLxGxK * w_BxL[:, :, None, None]
  if update == 'delta':
    # Only add what the memory does not already return for these keys.
    num = jnp.einsum('blgk,bgkv->blgv', sk_BxLxGxK, M)
    den = jnp.einsum('blgk,bgk->blg', sk_BxLxGxK, z)
    v_BxLxGxK = v_BxLxGxK - num / (den[..., None] + MEMORY_EPS)
  M = M + jnp.einsum('blgk,blgv->bgkv', sk, v_BxLxGxK)
  z = z + sk.sum(axis=1)
  return Memory(M, z, last)


@dataclasses.dataclass(frozen=True)
class InfiniSpec:
  """An Infini-attention sublayer: local attention (`attention`, usually the
  'dense' kernel) within segments of `segment_len`, plus the memory."""
  attention: AttentionSpec
  segment_len: int = 128
  update: str = 'delta'
  gate_lr_mult: float = 1.0

  def build(self, rngs: nnx.Rngs) -> 'InfiniAttention':
    return InfiniAttention(self, rngs=rngs)

  @property
  def matmul_params(self) -> int:
    return self.attention.matmul_params

  @property
  def window(self) -> int:
    return self.attention.window

  @property
  def score_width(self) -> int:
    return self.attention.score_width


class InfiniAttention(Attention):
  """GQA attention within segments + a gated compressive memory across them."""

  def __init__(self, spec: InfiniSpec, *, rngs: nnx.Rngs):
    super().__init__(spec.attention, rngs=rngs)
    if spec.update not in UPDATES:
      raise ValueError(f'Infini-attention update {spec.update!r} is invalid: one of {UPDATES}')
    if spec.segment_len <= 0:
      raise ValueError(f'Infini-attention segment_len={spec.segment_len} must be > 0')
    self.segment_len, self.update = spec.segment_len, spec.update
    # beta = 0: sigmoid 0.5, memory and local attention mixed equally at init.
    self.memory_gate = constant(
        jnp.zeros((spec.attention.num_heads,), dtype(spec.attention.param_dtype)), ('heads',),
        **{WEIGHT_DECAY: False, LR_MULT: float(spec.gate_lr_mult)})

  def project_unrotated(self, x_BxTxD: jax.Array):
    cd = self.compute_dtype
    x = x_BxTxD.astype(cd)
    q = jnp.einsum('btd,dhk->bthk', x, self.wq_DxHxK[...].astype(cd))
    k = jnp.einsum('btd,dgk->btgk', x, self.wk_DxGxK[...].astype(cd))
    v = jnp.einsum('btd,dgk->btgk', x, self.wv_DxGxK[...].astype(cd))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo) -> jax.Array:
    B, T, _ = x_BxTxD.shape
    H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
    L = min(self.segment_len, T)
    if T % L:
      raise ValueError(f'Infini-attention segment_len={self.segment_len} must divide the '
                       f'sequence length {T}')
    n = T // L
    q_raw, k_raw, v = self.project_unrotated(x_BxTxD)
    rope = dict(base=self.rope_base, sections=self.mrope_sections)
    q = apply_rope(q_raw, info.positions_BxTx3, **rope)
    k = apply_rope(k_raw, info.positions_BxTx3, **rope)

    def segments(x):  # [B, T, ...] -> [n, B, L, ...]
      return jnp.moveaxis(x.reshape(B, n, L, *x.shape[2:]), 1, 0)

    xs = jax.tree.map(segments, (q, k, v, q_raw, k_raw, info))
    gate_GxR = jax.nn.sigmoid(self.memory_gate[...].astype(jnp.float32)).reshape(G, H // G)

    def step(mem: Memory, seg):
      q_s, k_s, v_s, qr_s, kr_s, info_s = seg
      local = self.attend(q_s, k_s, v_s, info_s)
      sq = elu_plus_one(qr_s.astype(jnp.float32)).reshape(B, L, G, H // G, K)
      seg_BxL = info_s.segment_ids_BxT
      own = (seg_BxL == mem.doc[:, None]).astype(jnp.float32)[:, :, None, None, None]
      a_mem = memory_read(sq, mem) * own
      a_dot = local.astype(jnp.float32).reshape(B, L, G, H // G, K)
      out = gate_GxR[..., None] * a_mem + (1.0 - gate_GxR[..., None]) * a_dot
      sk = elu_plus_one(kr_s.astype(jnp.float32))
      mem = memory_write(mem, sk, v_s.astype(jnp.float32), seg_BxL, update=self.update)
      return mem, out.reshape(B, L, H, K).astype(v_s.dtype)

    mem0 = Memory(jnp.zeros((B, G, K, K), jnp.float32), jnp.zeros((B, G, K), jnp.float32),
                  jnp.full((B,), -1, jnp.int32))
    _, o = jax.lax.scan(step, mem0, xs)
    o_BxTxHxK = jnp.moveaxis(o, 0, 1).reshape(B, T, H, K)
    o_BxTxHxK = constrain(o_BxTxHxK, ('batch', 'length', 'act_heads', None))
    return self.output(o_BxTxHxK)
