"""Passkey retrieval over a depth x length grid: exact match, table and heat map.

For each (depth, length) cell, `samples` rows from `gemjax.data.passkey` are
scored with one teacher-forced forward pass: a row is an exact match when the
argmax at every answer position is the right digit. Under teacher forcing
that is the same as greedy decoding producing the whole key (the first wrong
digit is the first position where the argmax differs), at 1/digits the cost.

    grid = evaluate_passkey(params, mdef, lengths=(256, 512, 1024),
                            depths=(0, .25, .5, .75, 1), out_dir='runs/passkey')

writes `passkey.md` (a Markdown table) and `passkey.png` (a heat map).
Imports jax, numpy, gemjax.data.passkey, the model; matplotlib lazily.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemjax.data import passkey as pk
from gemjax.parallel import sharding as shd

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _make_forward(mdef):
  @jax.jit
  def forward(params, batch):
    model = nnx.merge(mdef.graphdef, params)
    logits, _, _ = model(batch)
    pred = jnp.argmax(logits, axis=-1)
    on_answer = batch['loss_weights'] > 0
    wrong = jnp.sum(on_answer & (pred != batch['targets']), axis=-1)
    return wrong == 0, pred
  return forward


def evaluate_passkey(params, mdef, *, lengths: Sequence[int],
                     depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 16,
                     batch_size: int = 16, digits: int = 5, seed: int = 1234,
                     mesh=None, out_dir: str | None = None,
                     train_length: int | None = None, by_generation: bool = True) -> dict:
  """Exact-match rate per (depth, length) of a model given as (params, ModelDef).

  Args:
    params: the model's pure-dict parameters (`state['params']`).
    mdef: `gemjax.train.state.ModelDef` of the same model.
    lengths: row lengths in bytes (each is one compiled forward shape).
    depths: needle depths in [0, 1].
    samples: rows per cell (random keys, fixed by `seed`).
    mesh: optional mesh to run under (batch over the data-like axes).
    out_dir: if given, writes passkey.md and passkey.png there.
    train_length: marked in the table/plot as the trained length.
    by_generation: also measure the grid by free-running greedy decoding
      with the KV cache (the prompt ends at "The pass key is ", the model
      writes `digits` tokens); `generated_exact_match` in the result.
  Returns:
    {'depths', 'lengths', 'exact_match' [len(depths), len(lengths)] float,
     'generated_exact_match' (same shape, or None), 'markdown': str,
     'files': [paths written]}.
  """
  forward = _make_forward(mdef)
  grid = np.zeros((len(depths), len(lengths)))
  gen_grid = np.zeros_like(grid) if by_generation else None
  sampler = None
  if by_generation:
    from gemjax.inference.decode import Sampler
    sampler = Sampler(graphdef=mdef.graphdef, params=params, mesh=mesh)
  for j, length in enumerate(lengths):
    for i, depth in enumerate(depths):
      rng = np.random.default_rng([seed, j, i])
      hits = gen_hits = 0
      for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        batch = pk.passkey_batch(rng, n, length, depth=depth, digits=digits)
        if mesh is not None:
          from gemjax.train.state import batch_shardings, to_global
          # Pad the rows to a multiple of the batch shards; padded rows are not counted.
          rows = math.prod(mesh.shape[a] for a in shd.BATCH_AXES if a in mesh.shape)
          pad = -n % rows
          batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
          shards = batch_shardings(mesh, {k: v.ndim for k, v in batch.items()})
          with shd.use_mesh(mesh):
            ok, _ = forward(params, to_global(batch, shards))
        else:
          ok, _ = forward(params, batch)
        hits += int(np.asarray(ok)[:n].sum())
        if sampler is not None:
          gen_hits += int(generated_exact(sampler, batch, length)[:n].sum())
      grid[i, j] = hits / samples
      if gen_grid is not None:
        gen_grid[i, j] = gen_hits / samples
  table = markdown_table(grid, depths, lengths, train_length=train_length)
  if gen_grid is not None:
    table += '\n\nBy greedy generation (KV cache):\n\n' + markdown_table(
        gen_grid, depths, lengths, train_length=train_length)
  result = {'depths': list(depths), 'lengths': list(lengths), 'exact_match': grid,
            'generated_exact_match': gen_grid, 'markdown': table, 'files': []}
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, 'passkey.md')
    with open(md, 'w') as f:
      f.write(table + '\n')
    result['files'] = [md, plot_heatmap(grid, depths, lengths,
                                        os.path.join(out_dir, 'passkey.png'),
                                        train_length=train_length)]
  return result


def generated_exact(sampler, batch, length: int) -> np.ndarray:
  """[B] bool: greedy decoding from the question writes exactly the key.

  The prompt of each row is its tokens up to the one that predicts the first
  answer digit (the answer positions are those with loss weight > 0).
  """
  w = np.asarray(batch['loss_weights']) > 0
  first = np.argmax(w, axis=1)
  digits = int(w.sum(axis=1).max())
  prompt = dict(batch)
  keep = np.arange(w.shape[1])[None] <= first[:, None]
  prompt['segment_ids'] = np.where(keep, batch['segment_ids'], 0).astype(np.int32)
  out = sampler.generate(prompt, max_new_tokens=digits, max_len=length)
  want = np.stack([np.asarray(batch['targets'])[r][w[r]] for r in range(w.shape[0])])
  return np.all(np.asarray(out.tokens_BxN) == want, axis=1)


def markdown_table(grid: np.ndarray, depths: Sequence[float], lengths: Sequence[int], *,
                   train_length: int | None = None) -> str:
  """Rows: depth; columns: length (bytes); cells: exact match in %; last row: mean."""
  def head(n):
    return f'{n}*' if train_length and n == train_length else str(n)
  lines = ['| depth \\ length | ' + ' | '.join(head(n) for n in lengths) + ' |',
           '|---' * (len(lengths) + 1) + '|']
  for i, d in enumerate(depths):
    lines.append(f'| {d:.2f} | ' + ' | '.join(f'{100 * x:.1f}' for x in grid[i]) + ' |')
  lines.append('| **mean** | ' + ' | '.join(f'**{100 * x:.1f}**' for x in grid.mean(0)) + ' |')
  if train_length:
    lines.append(f'\nExact match (%) of the whole key; * = longest trained length.')
  return '\n'.join(lines)


def plot_heatmap(grid: np.ndarray, depths: Sequence[float], lengths: Sequence[int],
                 path: str, *, train_length: int | None = None) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.8))
  im = ax.imshow(100 * grid, vmin=0, vmax=100, cmap='RdYlGn', aspect='auto')
  ax.set_xticks(range(len(lengths)),
                [f'{n}*' if n == train_length else str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f'{d:.2f}' for d in depths])
  ax.set_xlabel('context length (bytes)' + ('  (* = trained)' if train_length else ''))
  ax.set_ylabel('needle depth')
  for i in range(len(depths)):
    for j in range(len(lengths)):
      ax.text(j, i, f'{100 * grid[i, j]:.0f}', ha='center', va='center', fontsize=8)
  fig.colorbar(im, ax=ax, label='exact match (%)')
  ax.set_title('passkey retrieval')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
