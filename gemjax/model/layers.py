"""Small building blocks shared by every sublayer: params, RMSNorm, RoPE.

Parameters carry *logical* axis names in their `out_sharding` metadata; only
`gemjax.parallel.sharding` maps them to mesh axes. May import jax, flax and
`gemjax.parallel.sharding`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class SequenceInfo(NamedTuple):
  """Per-token side arrays every sublayer may need (see gemjax/batch.py).

  `index_BxT` is each token's index in its row before any layout permutation
  (ring attention's zigzag); causal masks compare it, never the array order.
  """
  positions_BxTx3: jax.Array
  segment_ids_BxT: jax.Array
  block_ids_BxT: jax.Array
  index_BxT: jax.Array
  modality_BxT: jax.Array


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], *,
          std: float, dtype=jnp.float32) -> nnx.Param:
  """A normally initialised parameter tagged with logical axis names."""
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


def project(x: jax.Array, w: jax.Array, n_in: int = 1, *, dtype=None) -> jax.Array:
  """Contract the last `n_in` dims of `x` with the first `n_in` dims of `w`.

  Written as one 2-D matmul over flattened tokens, [N, in] @ [in, out]: the
  same math as the einsum, but XLA:CPU runs the backward pass of 2-D dots
  several times faster than that of batched 3-D contractions, and TPU/GPU
  compile both to the same kernel. `dtype` is the compute dtype.
  """
  if dtype is not None:
    x, w = x.astype(dtype), w.astype(dtype)
  lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  if x.shape[x.ndim - n_in:] != ins:
    raise ValueError(f'project: input dims {x.shape} do not match weight dims {w.shape}')
  y = x.reshape(-1, math.prod(ins)) @ w.reshape(math.prod(ins), -1)
  return y.reshape(*lead, *outs)


def fan_in_std(fan_in: int) -> float:
  return 1.0 / math.sqrt(fan_in)


class RMSNorm(nnx.Module):
  """RMSNorm (Zhang & Sennrich 2019), statistics in float32, scale as (1 + w)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
               names: Sequence[str | None] = ('norm',)):
    self.eps = eps
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=tuple(names),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + self.scale[...].astype(jnp.float32))
    return y.astype(x.dtype)


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
  """Inverse frequencies of the head_dim/2 rotary pairs."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_section_ids(head_dim: int, sections: Sequence[int]) -> jax.Array:
  """Which of (t, h, w) drives each rotary pair (Qwen2-VL's M-RoPE).

  `sections` are relative weights; pairs are handed out in contiguous runs
  t..., h..., w... . On text (t = h = w) every choice equals 1D RoPE.
  """
  pairs = head_dim // 2
  total = sum(sections)
  counts = [pairs * s // total for s in sections]
  counts[0] += pairs - sum(counts)
  ids = []
  for axis, n in enumerate(counts):
    ids += [axis] * n
  return jnp.asarray(ids, jnp.int32)


def apply_rope(x_BxTxHxK: jax.Array, positions_BxTx3: jax.Array, *, base: float,
               sections: Sequence[int]) -> jax.Array:
  """Rotary embeddings (Su et al. 2021) with multimodal (t, h, w) positions.

  Rotates the two halves of the head dimension (the GPT-NeoX pairing), in f32.
  """
  K = x_BxTxHxK.shape[-1]
  inv_freq_P = rope_frequencies(K, base)
  section_P = mrope_section_ids(K, sections)
  pos_BxTxP = jnp.take(positions_BxTx3.astype(jnp.float32), section_P, axis=-1)
  angle_BxTxP = pos_BxTxP * inv_freq_P
  sin = jnp.sin(angle_BxTxP)[:, :, None, :]
  cos = jnp.cos(angle_BxTxP)[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., : K // 2], x[..., K // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)
