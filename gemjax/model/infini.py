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
contiguous documents the packer makes). Segments are aligned to the row,
not to each document: a document packed at offset 5 of a 128-token segment
has a first segment of 123 tokens, so its outputs are exact per document but
not equal to the same document alone at offset 0 (whose first memory write
comes after 128 tokens). Bidirectional blocks are honoured
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

from gemjax.kernels import cache as cache_lib
from gemjax.kernels.cache import KVCache
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


class InfiniCache(NamedTuple):
  """Decoding state of one Infini-attention layer.

  `local` holds the current (unfinished) segment's rotated keys and values
  in slot index mod segment_len; `keys_raw_BxLxGxK` the same tokens' un-rotated
  keys, which the memory update needs; `memory` every finished segment,
  folded in with the training rule when the segment's last token arrives.
  """
  local: KVCache
  keys_raw_BxLxGxK: jax.Array
  memory: Memory


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

  def keys_per_query(self, seq_len: int) -> int:
    """Softmax attention runs inside one segment only (earlier segments are
    read from the memory), so a query covers at most `segment_len` keys."""
    return self.attention.keys_per_query(min(self.segment_len, seq_len))

  def causal_keys_per_query(self, seq_len: int) -> float:
    """The causal triangle is per segment: half of it, as for a row of one segment."""
    return self.attention.causal_keys_per_query(min(self.segment_len, seq_len))


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

  def init_cache(self, batch_size: int, max_len: int, dtype) -> InfiniCache:
    """Memory for any length: a segment buffer and the K x K memory (max_len unused)."""
    del max_len
    B, G, K, L = batch_size, self.num_kv_heads, self.head_dim, self.segment_len
    return InfiniCache(
        cache_lib.init_cache(B, L, G, K, dtype), jnp.zeros((B, L, G, K), dtype),
        Memory(jnp.zeros((B, G, K, K), jnp.float32), jnp.zeros((B, G, K), jnp.float32),
               jnp.full((B,), -1, jnp.int32)))

  def _qkv(self, x_BxTxD: jax.Array, info: SequenceInfo):
    """(q, k rotated, v, q, k un-rotated): attention is rotated, the memory is not."""
    q_raw, k_raw, v = self.project_unrotated(x_BxTxD)
    rope = dict(base=self.rope_base, sections=self.mrope_sections)
    return (apply_rope(q_raw, info.positions_BxTx3, **rope), apply_rope(k_raw, info.positions_BxTx3, **rope),
            v, q_raw, k_raw)

  def _mix(self, a_mem, local, gate_GxR):
    return gate_GxR[..., None] * a_mem + (1.0 - gate_GxR[..., None]) * local

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo, cache: InfiniCache | None = None,
               *, prefill: bool = False):
    """Returns (y, cache) like `Attention`; decode steps take one token per row."""
    if cache is not None and not prefill:
      return self._decode(x_BxTxD, info, cache)
    B, T, _ = x_BxTxD.shape
    H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
    L = min(self.segment_len, T)
    if T % L:
      raise ValueError(f'Infini-attention segment_len={self.segment_len} must divide the '
                       f'sequence length {T}')
    n = T // L
    q, k, v, q_raw, k_raw = self._qkv(x_BxTxD, info)

    def segments(x):  # [B, T, ...] -> [n, B, L, ...]
      return jnp.moveaxis(x.reshape(B, n, L, *x.shape[2:]), 1, 0)

    xs = jax.tree.map(segments, (q, k, v, q_raw, k_raw, info))
    gate_GxR = jax.nn.sigmoid(self.memory_gate[...].astype(jnp.float32)).reshape(G, H // G)
    # Prefill: a row's memory takes only its finished segments (the rest of
    # the prompt waits in the segment buffer for the decode steps).
    length_B = jnp.max(jnp.where(info.segment_ids_BxT > 0, info.index_BxT, -1), axis=1) + 1

    def step(mem: Memory, seg):
      s, (q_s, k_s, v_s, qr_s, kr_s, info_s) = seg
      local = self.attend(q_s, k_s, v_s, info_s)
      sq = elu_plus_one(qr_s.astype(jnp.float32)).reshape(B, L, G, H // G, K)
      seg_BxL = info_s.segment_ids_BxT
      own = (seg_BxL == mem.doc[:, None]).astype(jnp.float32)[:, :, None, None, None]
      a_mem = memory_read(sq, mem) * own
      a_dot = local.astype(jnp.float32).reshape(B, L, G, H // G, K)
      out = self._mix(a_mem, a_dot, gate_GxR)
      sk = elu_plus_one(kr_s.astype(jnp.float32))
      new = memory_write(mem, sk, v_s.astype(jnp.float32), seg_BxL, update=self.update)
      if cache is not None:
        done_B = (s + 1) * self.segment_len <= length_B
        new = jax.tree.map(lambda a, b: jnp.where(
            done_B.reshape((B,) + (1,) * (a.ndim - 1)), a, b), new, mem)
      return new, out.reshape(B, L, H, K).astype(v_s.dtype)

    mem0 = (cache.memory if cache is not None else
            Memory(jnp.zeros((B, G, K, K), jnp.float32), jnp.zeros((B, G, K), jnp.float32),
                   jnp.full((B,), -1, jnp.int32)))
    mem, o = jax.lax.scan(step, mem0, (jnp.arange(n), xs))
    o_BxTxHxK = jnp.moveaxis(o, 0, 1).reshape(B, T, H, K)
    o_BxTxHxK = constrain(o_BxTxHxK, ('batch', 'length', 'act_heads', None))
    y = self.output(o_BxTxHxK)
    if cache is None:
      return y, None
    # The unfinished segment of each row goes to the buffer.
    Ls = self.segment_len
    start_B = (length_B // Ls) * Ls
    keep = (info.segment_ids_BxT > 0) & (info.index_BxT >= start_B[:, None])
    slot = cache_lib.write_slots(info.index_BxT, keep, total_slots=Ls)
    return y, self._buffer(cache, k, v, k_raw, info.index_BxT, slot, mem)

  @staticmethod
  def _buffer(cache: InfiniCache, k, v, k_raw, index_BxT, slot_BxT, mem) -> InfiniCache:
    """The cache with new tokens written to their segment-buffer slots."""
    local = cache_lib.write(cache.local, k, v, index_BxT, slot_BxT < cache.local.index_BxS.shape[1])
    return InfiniCache(local, cache_lib.put_slots(cache.keys_raw_BxLxGxK, k_raw, slot_BxT), mem)

  def _decode(self, x_BxTxD: jax.Array, info: SequenceInfo, cache: InfiniCache):
    """One token per row: local attention over the segment buffer + memory read;
    a row whose segment this token finishes folds the buffer into its memory."""
    B, T, _ = x_BxTxD.shape
    if T != 1:
      raise ValueError(f'Infini-attention decodes one token per row at a time, got {T}')
    H, G, K, Ls = self.num_heads, self.num_kv_heads, self.head_dim, self.segment_len
    q, k, v, q_raw, k_raw = self._qkv(x_BxTxD, info)
    idx_B = info.index_BxT[:, 0]
    seg_B = info.segment_ids_BxT[:, 0]
    slot = cache_lib.write_slots(info.index_BxT, seg_B[:, None] > 0, total_slots=Ls)
    written = self._buffer(cache, k, v, k_raw, info.index_BxT, slot, cache.memory)
    local, keys_raw = written.local, written.keys_raw_BxLxGxK
    # Only this segment's tokens are local (earlier ones live in the memory).
    start_B = (idx_B // Ls) * Ls
    index = jnp.where(local.index_BxS >= start_B[:, None], local.index_BxS, -1)
    a_dot = cache_lib.attend(q, KVCache(local.k_BxGxSxK, local.v_BxGxSxK, index),
                             info.index_BxT, window=self.window)
    gate_GxR = jax.nn.sigmoid(self.memory_gate[...].astype(jnp.float32)).reshape(G, H // G)
    mem = cache.memory
    sq = elu_plus_one(q_raw.astype(jnp.float32)).reshape(B, 1, G, H // G, K)
    own = (seg_B == mem.doc).astype(jnp.float32)[:, None, None, None, None]
    a_mem = memory_read(sq, mem) * own
    out = self._mix(a_mem, a_dot.astype(jnp.float32).reshape(B, 1, G, H // G, K), gate_GxR)
    # Fold a finished segment with the training rule (all slots are this segment's).
    seg_BxL = jnp.broadcast_to(seg_B[:, None], (B, Ls))
    new = memory_write(mem, elu_plus_one(keys_raw.astype(jnp.float32)),
                       jnp.swapaxes(local.v_BxGxSxK, 1, 2).astype(jnp.float32), seg_BxL,
                       update=self.update)
    fold_B = (seg_B > 0) & (idx_B % Ls == Ls - 1)
    mem = jax.tree.map(lambda a, b: jnp.where(
        fold_B.reshape((B,) + (1,) * (a.ndim - 1)), a, b), new, mem)
    o_BxTxHxK = out.reshape(B, 1, H, K).astype(v.dtype)
    return self.output(o_BxTxHxK), InfiniCache(local, keys_raw, mem)
