"""The mesh's vocabulary: axis names, sizes and the logical-axis table. Imports nothing.

The one home of the mesh axis names (`data, fsdp, expert, context, tensor`),
the data-like axes a batch is split over, the table from logical axis names
to mesh axes (`LOGICAL_AXIS_RULES`, plain data: `gemjax.parallel.sharding`
turns it into PartitionSpecs, `gemjax.parallel.mesh` checks a config's
widths against it without importing jax), and the size arithmetic every
sharded helper needs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

MESH_AXES = ('data', 'fsdp', 'expert', 'context', 'tensor')
# The batch is split over every data-like axis (experts see different tokens).
BATCH_AXES = ('data', 'fsdp', 'expert')
CONTEXT_AXIS = 'context'
EXPERT_AXIS = 'expert'
TENSOR_AXIS = 'tensor'

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
# Parameters: 'embed' (model width) is split over fsdp (ZeRO-3 style); heads,
# MLP hidden and vocabulary over tensor; experts over expert; the stacked
# layer axis is never split.
# Activations: the batch over every data-like axis, the sequence over context,
# widths replicated ('act_*') unless tensor parallelism splits heads/mlp.
LOGICAL_AXIS_RULES: dict[str, Any] = {
    # parameters
    'layers': None,
    'vocab': 'tensor',
    'embed': 'fsdp',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'mlp': 'tensor',
    'experts': 'expert',
    'expert_embed': 'fsdp',
    'norm': None,
    'patch': None,
    # activations
    'batch': BATCH_AXES,
    'length': 'context',
    'act_embed': None,
    'act_heads': 'tensor',
    'act_kv_heads': 'tensor',
    'act_mlp': 'tensor',
    'act_vocab': 'tensor',
    'act_experts': 'expert',
}


def axis_size(sizes: Mapping[str, int], entry: str | Sequence[str] | None) -> int:
  """Devices one PartitionSpec entry splits over (None -> 1, a tuple -> product)."""
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(sizes.get(a, 1) for a in names)
