"""Rotary position embeddings (Su et al. 2021) with multimodal (t, h, w) positions.

Qwen2-VL's M-RoPE: the head dimension's rotary pairs are split into runs
driven by the time, height and width position of each token; on text
(t = h = w) every split equals plain 1D RoPE. Imports jax only.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp


# (kind, factor, low_freq_factor, high_freq_factor, original_max_len): a
# hashable copy of config.RopeScalingConfig; NO_SCALING leaves RoPE as is.
RopeScaling = tuple
NO_SCALING: RopeScaling = ('none', 1.0, 1.0, 4.0, 8192)


def rope_frequencies(head_dim: int, base: float,
                     scaling: RopeScaling = NO_SCALING) -> jax.Array:
  """Inverse frequencies of the head_dim/2 rotary pairs.

  `scaling` stretches a pretrained model's context: 'linear' divides every
  frequency by the factor (positions / factor); 'llama3' divides only the
  low frequencies (wavelengths above original_max_len / low_freq_factor),
  keeps the high ones (below original_max_len / high_freq_factor) and blends
  linearly in between (Llama 3.1).
  """
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  kind, factor, low, high, original = scaling
  if kind == 'none':
    return inv_freq
  if kind == 'linear':
    return inv_freq / factor
  if kind == 'llama3':
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, blended, out)
  raise ValueError(f'unknown RoPE scaling {kind!r}')


def mrope_section_ids(head_dim: int, sections: Sequence[int]) -> jax.Array:
  """Which of (t, h, w) drives each rotary pair.

  `sections` are relative weights; pairs are handed out in contiguous runs
  t..., h..., w... .
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
               sections: Sequence[int], scaling: RopeScaling = NO_SCALING) -> jax.Array:
  """Rotates the two halves of the head dimension (the GPT-NeoX pairing, as
  Hugging Face's Llama/Gemma weights expect), in f32."""
  K = x_BxTxHxK.shape[-1]
  inv_freq_P = rope_frequencies(K, base, scaling)
  section_P = mrope_section_ids(K, sections)
  pos_BxTxP = jnp.take(positions_BxTx3.astype(jnp.float32), section_P, axis=-1)
  angle_BxTxP = pos_BxTxP * inv_freq_P
  sin = jnp.sin(angle_BxTxP)[:, :, None, :]
  cos = jnp.cos(angle_BxTxP)[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., : K // 2], x[..., K // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)
