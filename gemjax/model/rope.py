"""Rotary position embeddings (Su et al. 2021) with multimodal (t, h, w) positions.

Qwen2-VL's M-RoPE: the head dimension's rotary pairs are split into runs
driven by the time, height and width position of each token; on text
(t = h = w) every split equals plain 1D RoPE. Imports jax only.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
  """Inverse frequencies of the head_dim/2 rotary pairs."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


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
               sections: Sequence[int]) -> jax.Array:
  """Rotates the two halves of the head dimension (the GPT-NeoX pairing), in f32."""
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
