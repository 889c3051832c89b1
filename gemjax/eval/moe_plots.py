"""Expert-load heat maps: which experts each modality uses, layer by layer.

The MoE layers log `moe_load_by_modality` ([M, E] per layer: the fraction of a
modality's routed assignments that went to each expert). In the train/eval
metrics it appears per block of the layer pattern, stacked over the scanned
repeats: `aux/moe_load_by_modality/block{i}` with shape [G, M, E], layer
`g * period + i`. `expert_load_from_metrics` turns those back into one
[L_moe, M, E] array; `plot_expert_load` draws it as one panel per modality
(rows = MoE layers, columns = experts) into a PNG.

A collapsed router shows as one bright column; modality-specialised experts as
columns that light up in one panel only.

Imports numpy, matplotlib (Agg canvas, no pyplot state) and gemjax.batch.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from gemjax.batch import MODALITY_NAMES
_KEY = re.compile(r'(?:^|/)moe_load_by_modality/block(\d+)$')


def expert_load_from_metrics(metrics: Mapping[str, Any], *,
                             period: int | None = None) -> tuple[np.ndarray, list[int]]:
  """(load_LxMxE, layer indices) from the per-block aux metrics.

  `period` is the number of blocks in one repeat of the layer pattern
  (len(decoder_spec(cfg).period)); by default the highest MoE block index
  + 1, which is right because the last block of a period is always MoE.
  """
  blocks = {}
  for key, value in metrics.items():
    m = _KEY.search(key)
    if m:
      v = np.asarray(value, np.float32)
      blocks[int(m.group(1))] = v if v.ndim == 3 else v[None]
  if not blocks:
    raise ValueError('no moe_load_by_modality/block* entries in the metrics; '
                     'is the model an MoE model (model.moe.num_experts > 0)?')
  period = period or max(blocks) + 1
  layers = {}
  for i, v in blocks.items():
    for g in range(v.shape[0]):
      layers[g * period + i] = v[g]
  order = sorted(layers)
  return np.stack([layers[l] for l in order]), order


def plot_expert_load(load_LxMxE: np.ndarray, path: str, *, layers: Sequence[int] | None = None,
                     modality_names: Sequence[str] = MODALITY_NAMES, skip_empty: bool = True,
                     title: str | None = None) -> str:
  """Writes the heat map PNG to `path` and returns the path.

  `skip_empty` leaves out modalities with no routed tokens (all-zero rows).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  load = np.asarray(load_LxMxE, np.float32)
  if load.ndim != 3:
    raise ValueError(f'expected load [layers, modalities, experts], got shape {load.shape}')
  L, M, E = load.shape
  layers = list(layers) if layers is not None else list(range(L))
  names = list(modality_names)[:M] + [f'modality {m}' for m in range(len(modality_names), M)]
  panels = [m for m in range(M) if not skip_empty or load[:, m].sum() > 0] or [0]
  vmax = max(float(load.max()), 1e-6)

  # Panels stay readable from 8 experts x 2 layers to 128 experts x 64 layers.
  panel_w, height = min(0.3 * E, 6.0) + 0.4, min(1.4 + 0.3 * L, 10.0)
  fig = Figure(figsize=(1.2 + panel_w * len(panels), height), dpi=120, layout='constrained')
  x_step, y_step = max(1, E // 16), max(1, L // 16)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  im = None
  for ax, m in zip(axes, panels):
    im = ax.imshow(load[:, m], aspect='auto', cmap='viridis', vmin=0.0, vmax=vmax,
                   interpolation='nearest')
    ax.set_title(names[m])
    ax.set_xlabel('expert')
    ax.set_xticks(range(0, E, x_step))
    ax.set_yticks(range(0, L, y_step))
    ax.set_yticklabels([str(l) for l in layers[::y_step]])
  axes[0].set_ylabel('layer')
  fig.colorbar(im, ax=list(axes), label='fraction of assignments')
  fig.suptitle(title or f'expert load (uniform = {1.0 / E:.3f})')
  fig.savefig(path)
  return path
