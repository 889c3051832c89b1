"""The mesh's vocabulary: axis names and sizes. Imports nothing.

The one home of the mesh axis names (`data, fsdp, expert, context, tensor`),
the data-like axes a batch is split over, and the size arithmetic every
sharded helper needs. Config validation, the mesh builder, the logical-axis
rules and the shard_map wrappers all read these names from here.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

MESH_AXES = ('data', 'fsdp', 'expert', 'context', 'tensor')
# The batch is split over every data-like axis (experts see different tokens).
BATCH_AXES = ('data', 'fsdp', 'expert')
CONTEXT_AXIS = 'context'
EXPERT_AXIS = 'expert'
TENSOR_AXIS = 'tensor'


def axis_size(sizes: Mapping[str, int], entry: str | Sequence[str] | None) -> int:
  """Devices one PartitionSpec entry splits over (None -> 1, a tuple -> product)."""
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(sizes.get(a, 1) for a in names)
