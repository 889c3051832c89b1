"""The per-token side arrays every sublayer may read (see gemjax/batch.py).

`SequenceInfo` is built once per forward pass from the batch and handed to
every block; attention kernels read its three mask fields (it satisfies
`gemjax.kernels.MaskInfo` by attribute). Imports jax only.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp


class SequenceInfo(NamedTuple):
  """`index_BxT` is each token's index in its row before any layout permutation
  (ring attention's zigzag); causal masks compare it, never the array order.
  """
  positions_BxTx3: jax.Array
  segment_ids_BxT: jax.Array
  block_ids_BxT: jax.Array
  index_BxT: jax.Array
  modality_BxT: jax.Array


def sequence_info(batch: Mapping[str, jax.Array]) -> SequenceInfo:
  """The side arrays of a batch; `token_index` defaults to 0..T-1 (no layout)."""
  tokens = batch['tokens']
  B, T = tokens.shape
  index = batch.get('token_index')
  if index is None:
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return SequenceInfo(
      positions_BxTx3=batch['positions'], segment_ids_BxT=batch['segment_ids'],
      block_ids_BxT=batch['block_ids'], index_BxT=index, modality_BxT=batch['modality'])
