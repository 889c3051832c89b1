"""Attention math, and nothing else: the ground floor of gemjax.

    mask.py      which key each query may see (segments x blocks x causal x window)
    dense.py     the full score matrix (custom VJP) and the autodiff reference
    flash.py     blockwise / flash attention: online softmax over chunks, custom VJP,
                 and the chunk-level pieces ring attention reuses
    platform.py  fused platform kernels: cuDNN (GPU) and Pallas splash (TPU)

Every kernel works on the local arrays it is given; none knows a mesh or a
config. Picking a kernel, falling back when a platform kernel cannot run,
and sharding over a mesh happen above (`gemjax.model.attention`,
`gemjax.parallel.ring_attention`). Imports jax only.
"""

from gemjax.kernels.dense import dense_attention, naive_attention
from gemjax.kernels.flash import DEFAULT_BLOCK, blockwise_attention
from gemjax.kernels.mask import NEG_INF, MaskInfo, visible_mask

__all__ = ['DEFAULT_BLOCK', 'MaskInfo', 'NEG_INF', 'blockwise_attention', 'dense_attention',
           'naive_attention', 'visible_mask']
