"""Grouped-query self-attention with QK-norm and multimodal RoPE.

`Attention` owns the projections; the score/softmax/value part is a kernel
from `KERNELS`, a static table of the attention kinds gemjax ships (the
`model.attention` names that are not whole sublayers of their own, like
'infini'). Every entry has the same signature,

    kernel(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None,
           causal=True, window=0, block=DEFAULT_BLOCK, softcap=0.0) -> o_BxTxHxK

and the same mask (gemjax/kernels/mask.py); `block` is the chunk size of the
chunked kernels (ignored by 'dense'). The math lives in `gemjax.kernels`,
the mesh-aware maps in `gemjax.parallel.ring_attention`; the entries here
only choose between them (platform kernels fall back to 'blockwise' where
they cannot run). Imports kernels, parallel and the model's building blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.kernels import dense as dense_lib
from gemjax.kernels import platform
from gemjax.kernels.cache import KVCache, init_cache
from gemjax.kernels.flash import DEFAULT_BLOCK
from gemjax.model.info import SequenceInfo
from gemjax.model.norm import RMSNorm
from gemjax.model.params import dtype, fan_in_std, param, project
from gemjax.model.rope import NO_SCALING, apply_rope
from gemjax.parallel import kv_cache
from gemjax.parallel.ring_attention import ring_attention, sharded_blockwise
from gemjax.parallel.sharding import constrain, current_mesh, logical_to_spec, target_platform


class AttentionKernel(Protocol):

  def __call__(self, q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
               mask, *, kv_mask=None, causal: bool = True, window: int = 0,
               block: int = DEFAULT_BLOCK, softcap: float = 0.0) -> jax.Array:
    ...


def _no_softcap(kernel: str, softcap: float) -> None:
  if softcap:
    raise ValueError(f"attention score soft-capping is not implemented by the {kernel!r} "
                     "kernel; use 'blockwise', 'dense' or 'ring'")


# ------------------------------------------------------------------ kernels


def dense_kernel(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None, causal=True,
                 window=0, block=DEFAULT_BLOCK, softcap=0.0):
  """The full [T, S] score matrix (GSPMD shards it like any other einsum)."""
  del block
  return dense_lib.dense_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, kv_mask=kv_mask,
                                   causal=causal, window=window, softcap=softcap)


def blockwise_kernel(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None, causal=True,
                     window=0, block=DEFAULT_BLOCK, softcap=0.0):
  """Exact chunked attention, each device on its own batch/head shard."""
  return sharded_blockwise(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, kv_mask=kv_mask,
                           causal=causal, window=window, block=block, softcap=softcap)


def ring_kernel(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None, causal=True,
                window=0, block=DEFAULT_BLOCK, softcap=0.0):
  """The sequence split over the 'context' mesh axis (self-attention only)."""
  if kv_mask is not None:
    raise ValueError("the 'ring' kernel is self-attention: keys are the queries' tokens")
  return ring_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, causal=causal,
                        window=window, block=block, softcap=softcap)


def cudnn_kernel(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None, causal=True,
                 window=0, block=DEFAULT_BLOCK, softcap=0.0):
  """cuDNN fused attention where it fits, else 'blockwise'.

  Static fallback (off GPU, a GPU older than Hopper, cuDNN < 9.6, f32, odd
  head dims) and run-time fallback (`lax.cond` on the batch: bidirectional
  blocks, permuted layouts, more than `platform.CUDNN_MAX_SEGMENTS` runs of
  segment ids in a row) both go to 'blockwise'. Packed and padded rows run
  cuDNN (its packed layout), per device in a `shard_map` under a mesh so
  that each device's segment offsets describe its own rows.
  """
  _no_softcap('cudnn', softcap)
  fallback = functools.partial(blockwise_kernel, kv_mask=kv_mask, causal=causal,
                               window=window, block=block)
  if kv_mask is not None or not platform.cudnn_static_ok(q_BxTxHxK, k_BxSxGxK, causal, window,
                                                         target_platform()):
    return fallback(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  fused = _per_device(functools.partial(platform.cudnn_attention, causal=causal,
                                        window=window))
  return jax.lax.cond(platform.cudnn_mask_ok(mask),
                      lambda q, k, v: fused(q, k, v, mask.segment_ids_BxT),
                      lambda q, k, v: fallback(q, k, v, mask),
                      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK)


def splash_kernel(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, *, kv_mask=None, causal=True,
                  window=0, block=DEFAULT_BLOCK, softcap=0.0, interpret: bool = False):
  """Pallas splash attention on TPU where it fits, else 'blockwise'.

  A Pallas call is not partitioned by GSPMD: under a multi-device mesh it
  runs in a `shard_map`, each device on its own rows (batch axes) and heads
  (tensor). The sequence must be whole on every device (`mesh.context` 1,
  which config validation enforces for 'splash').
  """
  _no_softcap('splash', softcap)
  fallback = functools.partial(blockwise_kernel, kv_mask=kv_mask, causal=causal,
                               window=window, block=block)
  if kv_mask is not None or not platform.splash_static_ok(
      q_BxTxHxK, k_BxSxGxK, causal, window, interpret, target_platform()):
    return fallback(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  fused = _per_device(functools.partial(platform.splash_attention, causal=causal,
                                        window=window, interpret=interpret))
  return jax.lax.cond(platform.splash_mask_ok(mask),
                      lambda q, k, v: fused(q, k, v, mask.segment_ids_BxT),
                      lambda q, k, v: fallback(q, k, v, mask),
                      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK)


class _Segments(NamedTuple):
  segment_ids_BxT: jax.Array


def _per_device(fused):
  """fused(q, k, v, mask) as fn(q, k, v, segment_ids): run as is without a
  mesh, else in a shard_map over the axes that split rows and heads (fused
  kernels see their device's rows; `mask` carries segment ids only).
  Query head i uses KV head i // (H / G), so splitting both over 'tensor'
  keeps each group on one device."""
  def run(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, seg_BxT):
    mesh = current_mesh()
    call = lambda q, k, v, seg: fused(q, k, v, _Segments(seg))
    if mesh is None or mesh.size == 1:
      return call(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, seg_BxT)
    q_spec = logical_to_spec(('batch', 'length', 'act_heads', None), mesh)
    kv_spec = logical_to_spec(('batch', 'length', 'act_kv_heads', None), mesh)
    seg_spec = logical_to_spec(('batch', 'length'), mesh)
    return jax.shard_map(call, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(
                             q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, seg_BxT)
  return run


def platform_fallback(attention: str, *, seq_len: int, head_dim: int, compute_dtype: str,
                      backend: str | None = None) -> str | None:
  """When the platform kernel `attention` will not run (or not always): a
  sentence saying so and why, for the start-up log; None when it runs, or
  for kernels that are not platform kernels."""
  backend = backend or jax.default_backend()
  if attention == 'splash':
    if backend != 'tpu':
      return (f"model.attention='splash' runs the 'blockwise' kernel here: splash is a "
              f"TPU kernel and the backend is {backend}")
    if seq_len % 128 or head_dim % 128:
      return (f"model.attention='splash' runs the 'blockwise' kernel: it needs "
              f"train.seq_len ({seq_len}) and model.head_dim ({head_dim}) to be "
              "multiples of 128")
    return ("model.attention='splash': rows with bidirectional blocks (image, audio, "
            "video) or a context layout take the 'blockwise' kernel at run time; plain "
            "and packed text rows run splash")
  if attention == 'cudnn':
    if backend != 'gpu':
      return (f"model.attention='cudnn' runs the 'blockwise' kernel here: cuDNN attention "
              f"is a GPU kernel and the backend is {backend}")
    if compute_dtype not in ('bfloat16', 'float16', 'auto') or head_dim % 8 or head_dim > 256:
      return (f"model.attention='cudnn' runs the 'blockwise' kernel: it needs a 16-bit "
              f"compute dtype (model.compute_dtype={compute_dtype!r}) and model.head_dim "
              f"a multiple of 8 up to 256 ({head_dim})")
    if backend == jax.default_backend():     # the devices here are the ones it runs on
      if not platform.hopper_or_later():
        return ("model.attention='cudnn' runs the 'blockwise' kernel: cuDNN's packed layout "
                f"needs an NVIDIA GPU of compute capability 9.0 or later (this one: "
                f"{getattr(jax.devices()[0], 'compute_capability', 'none')})")
      if (version := platform.cudnn_version()) < 90600:
        return ("model.attention='cudnn' runs the 'blockwise' kernel: cuDNN's packed layout "
                f"needs cuDNN 9.6 or later (JAX has {version or 'none'})")
    return ("model.attention='cudnn': batches with bidirectional blocks (image, audio, "
            "video), a context layout or a row of more than "
            f"{platform.CUDNN_MAX_SEGMENTS} segment runs take the 'blockwise' kernel at run "
            "time; plain, packed and padded text rows run cuDNN")
  return None


KERNELS: dict[str, AttentionKernel] = {
    'blockwise': blockwise_kernel,
    'dense': dense_kernel,
    'ring': ring_kernel,
    'cudnn': cudnn_kernel,
    'splash': splash_kernel,
}


# ------------------------------------------------------------------- module


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Everything one attention sublayer is built from."""
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_base: float = 10_000.0
  mrope_sections: tuple[int, ...] = (2, 1, 1)
  rope_scaling: tuple = NO_SCALING
  qk_norm: bool = True
  norm_plus_one: bool = True
  # Scores soft-cap (0 = off) and scale (0 = head_dim ** -0.5).
  softcap: float = 0.0
  query_scale: float = 0.0
  kernel: str = 'blockwise'
  block: int = DEFAULT_BLOCK
  window: int = 0
  causal: bool = True
  norm_eps: float = 1e-6
  compute_dtype: str = 'float32'
  param_dtype: str = 'float32'

  def build(self, rngs: nnx.Rngs) -> 'Attention':
    return Attention(self, rngs=rngs)

  @property
  def matmul_params(self) -> int:
    """q, k, v and output projection weights (for FLOPs)."""
    d, h, g, k = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
    return d * h * k + 2 * d * g * k + h * k * d

  @property
  def score_width(self) -> int:
    """heads x head_dim: the width of the score and value matmuls (for FLOPs)."""
    return self.num_heads * self.head_dim

  def keys_per_query(self, seq_len: int) -> int:
    """Keys a query's score/value matmuls cover in a row of `seq_len` (for
    FLOPs): `window` for a sliding-window layer, else the whole row."""
    return min(self.window, seq_len) if self.window else seq_len

  def causal_keys_per_query(self, seq_len: int) -> float:
    """Keys per query with the causal mask discounted, continuous count: a
    row of T with band width W = keys_per_query(T) has T*W - W^2/2 visible
    pairs (T^2/2, "half the square", for global attention). Non-causal
    layers see their whole band."""
    w = self.keys_per_query(seq_len)
    return w - w * w / (2 * seq_len) if self.causal else float(w)


class Attention(nnx.Module):
  """Pre-projected GQA: x -> q, k, v -> (QK-norm) -> RoPE -> kernel -> out."""

  def __init__(self, spec: AttentionSpec, *, rngs: nnx.Rngs):
    if spec.kernel not in KERNELS:
      raise ValueError(f'unknown attention kernel {spec.kernel!r}; known: {sorted(KERNELS)}')
    d, h, g, k = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
    pd = dtype(spec.param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = h, g, k
    self.rope_base, self.mrope_sections = spec.rope_base, tuple(spec.mrope_sections)
    self.rope_scaling = tuple(spec.rope_scaling)
    self.softcap = spec.softcap
    # Kernels scale scores by head_dim ** -0.5: another scale is folded into q.
    self.q_mult = spec.query_scale * k ** 0.5 if spec.query_scale else 0.0
    self.kernel, self.block = spec.kernel, spec.block
    self.window, self.causal = spec.window, spec.causal
    self.compute_dtype = dtype(spec.compute_dtype)
    std = fan_in_std(d)
    self.wq_DxHxK = param(rngs, (d, h, k), ('embed', 'heads', 'head_dim'), std=std, dtype=pd)
    self.wk_DxGxK = param(rngs, (d, g, k), ('embed', 'kv_heads', 'head_dim'), std=std, dtype=pd)
    self.wv_DxGxK = param(rngs, (d, g, k), ('embed', 'kv_heads', 'head_dim'), std=std, dtype=pd)
    self.wo_HxKxD = param(rngs, (h, k, d), ('heads', 'head_dim', 'embed'),
                          std=fan_in_std(h * k), dtype=pd)
    if spec.qk_norm:
      self.q_norm = RMSNorm(k, eps=spec.norm_eps, param_dtype=pd, plus_one=spec.norm_plus_one)
      self.k_norm = RMSNorm(k, eps=spec.norm_eps, param_dtype=pd, plus_one=spec.norm_plus_one)
    else:
      self.q_norm = self.k_norm = None

  def attend(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, **kw) -> jax.Array:
    """This layer's kernel with its mask settings and chunk size."""
    if self.softcap:
      kw['softcap'] = self.softcap
    return KERNELS[self.kernel](q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, causal=self.causal,
                                window=self.window, block=self.block, **kw)

  def project_qkv(self, x_BxTxD: jax.Array, info: SequenceInfo):
    cd = self.compute_dtype
    q = project(x_BxTxD, self.wq_DxHxK[...], dtype=cd)
    k = project(x_BxTxD, self.wk_DxGxK[...], dtype=cd)
    v = project(x_BxTxD, self.wv_DxGxK[...], dtype=cd)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    rope = dict(base=self.rope_base, sections=self.mrope_sections, scaling=self.rope_scaling)
    q = apply_rope(q, info.positions_BxTx3, **rope)
    k = apply_rope(k, info.positions_BxTx3, **rope)
    if self.q_mult:
      q = q * jnp.asarray(self.q_mult, q.dtype)
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    k = constrain(k, ('batch', 'length', 'act_kv_heads', None))
    v = constrain(v, ('batch', 'length', 'act_kv_heads', None))
    return q, k, v

  def output(self, o_BxTxHxK: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    y = project(o_BxTxHxK, self.wo_HxKxD[...], 2, dtype=cd)
    return constrain(y, ('batch', 'length', 'act_embed'))

  def cache_slots(self, max_len: int) -> int:
    """Slots this layer keeps: a rolling buffer of `window` for sliding-window layers."""
    return min(self.window, max_len) if self.window else max_len

  def init_cache(self, batch_size: int, max_len: int, dtype) -> KVCache:
    return init_cache(batch_size, self.cache_slots(max_len), self.num_kv_heads,
                      self.head_dim, dtype)

  def __call__(self, x_BxTxD: jax.Array, info: SequenceInfo, cache: KVCache | None = None,
               *, prefill: bool = False) -> tuple[jax.Array, KVCache | None]:
    """Returns (y, cache): the new cache, or None when none was given.

    With a cache, the new tokens' keys/values are written at their token
    index (`info.index_BxT`; padding, segment id 0, is not written). Prefill:
    the new tokens are a whole prompt (the rows' caches hold nothing yet) and
    attend to each other with this layer's kernel and full mask (media blocks
    stay bidirectional). Decode: text-like tokens that attend, causally, to
    everything the cache holds (`gemjax.parallel.kv_cache`).
    """
    q, k, v = self.project_qkv(x_BxTxD, info)
    if cache is None:
      return self.output(self.attend(q, k, v, info)), None
    cache = kv_cache.write(cache, k, v, info.index_BxT, info.segment_ids_BxT > 0)
    if prefill:
      o = self.attend(q, k, v, info)
    else:
      o = kv_cache.attend(q, cache, info.index_BxT, window=self.window, softcap=self.softcap)
    return self.output(o), cache
