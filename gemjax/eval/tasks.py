"""Per-task accuracy on held-out records, and the Markdown + PNG report.

Each evaluation record is built with the run's SequenceBuilder and put in its
own row (no packing, so every row is one task instance). The answer is the
span with loss weight > 0. Task accuracy is measured twice: by generation
(the prompt decoded greedily with the KV cache, `gemjax.inference`, until
end-of-sequence; exact when it writes the answer and then eos) and under
teacher forcing (every answer token is the argmax given the correct prefix).
In exact arithmetic the two agree; they are reported side by side, with the
loss and token accuracy of the answer.

The teacher-forced scoring is train's (gemjax/train/evaluation.py, shared
with evaluation during training); generation comes from inference/.
Imports matplotlib for plots.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

from gemjax.batch import MODALITY_NAMES, patch_budgets
from gemjax.errors import BadInputError
from gemjax.train import evaluation
from gemjax.train.evaluation import iter_records  # noqa: F401  (public here too)


def evaluate_tasks(cfg, params, mdef, mesh, datasets: Iterable[Any], *,
                   batch_size: int = 16, max_records: int = 0,
                   by_generation: bool = True, out_dir: str | None = None) -> dict[str, dict]:
  """Per-task {records, exact_match, token_accuracy, loss, bad} and, with
  `by_generation`, generated_exact_match / generated_records: the prompt (the
  record up to its trailing predicted segments) decoded greedily with the KV
  cache until end-of-sequence; exact when the generated tokens are the
  answer's followed by eos. Tasks with no prompt (plain text) are not generated.
  Records whose answer holds an image are drawn instead (gemjax/eval/drawing.py):
  their results go under 'drawing', and with `out_dir` a PNG grid per task
  (its path under 'drawing_grid').
  """
  from gemjax.data.registry import sequence_builder
  builder = sequence_builder(cfg)
  gen = None
  if by_generation:
    from gemjax.inference.generator import Generator
    from gemjax.inference.prompts import bucket
    gen = Generator.from_config(cfg, params, mdef, mesh)
  drawing = None
  if gen is not None and gen.image_codes is not None:
    from gemjax.eval import drawing as drawing_lib
    from gemjax.eval.digits import default_classifier
    from gemjax.inference.decode import SamplingConfig
    e = cfg.eval
    sampling = (SamplingConfig(temperature=e.image_temperature, top_k=e.image_top_k)
                if e.image_temperature > 0 else SamplingConfig(greedy=True))
    drawing = drawing_lib.DrawingEval(
        gen, guidance_scale=e.guidance_scale if e.guidance_scale != 1 else None,
        sampling=sampling, batch_size=batch_size, seed=cfg.train.seed,
        classifier=default_classifier())
  gen_pending: list[tuple[str, dict, np.ndarray]] = []
  scorer = evaluation.TaskScorer(builder, mdef, mesh, seq_len=cfg.train.seq_len,
                                 budgets=patch_budgets(cfg.data), batch_size=batch_size)
  acc = scorer.counts
  pending: list[tuple[str, dict]] = []

  def flush():
    if pending:
      scorer.score(params, [t for t, _ in pending], scorer.collate([ex for _, ex in pending]))
      pending.clear()

  def gen_flush():
    if not gen_pending:
      return
    longest = max(len(want) for _, _, want in gen_pending)
    # A bucket (16, 32, ...): the loop stops at eos, so room costs nothing,
    # and a task's batches share one compiled shape.
    new = bucket(longest, 16)
    # Every call has batch_size rows (the last one of a task padded with
    # copies, their answers ignored): one compiled shape per task, not two.
    examples = [ex for _, ex, _ in gen_pending]
    examples += examples[:1] * (batch_size - len(examples))
    out = gen.generate_ids(examples, max_new_tokens=new, stop_tokens=(builder.layout.eos,))
    toks = np.asarray(out.tokens_BxN)
    for i, (task, _, want) in enumerate(gen_pending):
      c = acc[task]
      c['gen_records'] += 1
      c['gen_exact'] += int(np.array_equal(toks[i, :len(want)], want))
    gen_pending.clear()

  def gen_item(task, rec, ex, where):
    from gemjax.inference.prompts import split_answer
    prompt_rec, answer = split_answer(rec)
    if not prompt_rec['segments'] or not answer:
      return
    if any(s.get('kind') == 'image' for s in answer):
      if drawing is not None:
        drawing.add(task, prompt_rec, answer, rec.get('meta'))
      return
    p = gen.encoder.example(prompt_rec, where)
    n = len(p['tokens'])
    if not np.array_equal(p['tokens'], ex['tokens'][:n]):
      raise BadInputError('record', where, 'its prompt does not tokenize as a prefix of '
                          'the whole record')
    gen_pending.append((task, p, ex['tokens'][n:]))
    if len(gen_pending) == batch_size:
      gen_flush()

  for task, where, rec in evaluation.iter_task_records(datasets, max_records):
    try:
      if rec is None:
        raise BadInputError('record', where, 'unreadable record')
      ex = builder.build(rec, source=where)
    except BadInputError:
      scorer.bad(task)
      continue
    pending.append((task, ex))
    if len(pending) == batch_size:
      flush()
    if gen is not None:
      gen_item(task, rec, ex, where)
  flush()
  if gen is not None:
    gen_flush()
  out = scorer.results()
  for task, c in acc.items():
    if c['gen_records']:
      out[task]['generated_records'] = c['gen_records']
      out[task]['generated_exact_match'] = c['gen_exact'] / c['gen_records']
  if drawing is not None:
    for task, r in drawing.results().items():
      out.setdefault(task, {'records': 0, 'bad': 0, 'exact_match': 0.0,
                            'token_accuracy': 0.0, 'loss': 0.0})['drawing'] = r
    if out_dir is not None:
      for path in drawing.write_grids(out_dir):
        task = os.path.basename(path)[len('drawn_'):-len('.png')]
        out[task]['drawing_grid'] = path
  return out


# ------------------------------------------------------------------- report


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _by_step(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` in order of step; a step logged twice (a
  resumed run replays steps) keeps its last value; non-finite values (logged
  as strings) are left out."""
  last = {r['step']: r[key] for r in rows if isinstance(r.get(key), (int, float))}
  steps = sorted(last)
  return steps, [float(last[s]) for s in steps]


def loss_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
  """The loss curves of a run's metrics.jsonl rows, by label: 'train' (the
  total) and 'train <modality>' from the training rows, and 'eval' and
  'eval <modality>' from the evaluations during training (`eval.every`,
  split 'eval'), when there are any. Every curve is the cross-entropy: the
  training total is its `nll` (without z-loss and MoE losses, like the eval
  loss) where logged."""
  out = {}
  for split in ('train', 'eval'):
    part = [r for r in rows if r.get('split') == split]
    total = 'nll' if split == 'train' and any('nll' in r for r in part) else 'loss'
    for key, label in [(total, split)] + [(f'loss/{m}', f'{split} {m}') for m in MODALITY_NAMES]:
      steps, values = _by_step(part, key)
      if steps:
        out[label] = (steps, values)
  return out


def eval_task_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
  """task -> (steps, teacher-forced exact match) from the evaluations during
  training (split 'eval', keys '<task>/exact_match')."""
  part = [r for r in rows if r.get('split') == 'eval']
  tasks = sorted({k[:-len('/exact_match')] for r in part for k in r
                  if k.endswith('/exact_match')})
  return {t: _by_step(part, f'{t}/exact_match') for t in tasks}


def plot_loss_curves(rows: list[dict], out_png: str) -> bool:
  """Training loss overall and per predicted modality, with the eval-split
  loss (dashed, markers) of the evaluations during training next to it, and,
  when those scored tasks, a second panel of their teacher-forced exact
  match. One PNG; False (nothing drawn) without training rows."""
  series = loss_series(rows)
  if 'train' not in series:
    return False
  tasks = eval_task_series(rows)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(11 if tasks else 6, 3.5), dpi=120,
                           squeeze=False)
  ax = axes[0, 0]
  colors = {'': 'black'}
  colors.update({m: f'C{i}' for i, m in enumerate(MODALITY_NAMES)})
  for label, (steps, values) in series.items():
    split, _, name = label.partition(' ')
    style = dict(color=colors[name], label=f'{split} {name or "total"}')
    if split == 'eval':
      style.update(linestyle='--', marker='o', markersize=3)
    ax.plot(steps, values, **style)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats / token)')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  if tasks:
    ax = axes[0, 1]
    for task, (steps, values) in tasks.items():
      ax.plot(steps, values, marker='o', markersize=3, label=task)
    ax.set_xlabel('step')
    ax.set_ylabel('exact match (eval, teacher-forced)')
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_png)
  plt.close(fig)
  return True


def write_task_report(out_dir: str, title: str, overall: Mapping[str, Any],
                      tasks: Mapping[str, Mapping[str, Any]], plots: list[str]) -> str:
  lines = [f'# {title}', '', '## Tasks (test split, one record per row)', '',
           'Exact match by generation: greedy decoding with the KV cache from the '
           'prompt until end-of-sequence. Teacher-forced: every answer token is the '
           'argmax given the correct prefix.', '',
           '| task | records | exact match (generated) | exact match (teacher-forced) | '
           'answer token accuracy | answer loss | bad records |',
           '|---|---|---|---|---|---|---|']
  for task, r in tasks.items():
    g = r.get('generated_exact_match')
    gen = f'{g:.1%}' if g is not None else 'n/a'
    lines.append(f"| {task} | {r['records']} | {gen} | {r['exact_match']:.1%} | "
                 f"{r['token_accuracy']:.1%} | {r['loss']:.3f} | {r['bad']} |")
  drawn = {t: r for t, r in tasks.items() if 'drawing' in r}
  if drawn:
    lines += ['', '## Image output (drawn by the model)', '',
              'Constrained decoding with classifier-free guidance. Well formed: exactly '
              'H*W codes then end-image. Drawn as requested / named as drawn: read by an '
              'independent digit classifier trained on real training digits only '
              '(gemjax/eval/digits.py).', '',
              '| task | records | well formed | drawn as requested | named as drawn | '
              'guidance scale |', '|---|---|---|---|---|---|']
    for task, r in drawn.items():
      d = r['drawing']
      cells = [f"{d[k]:.1%}" if k in d else 'n/a'
               for k in ('well_formed', 'drawn_as_requested', 'named_as_drawn')]
      lines.append(f"| {task} | {d['records']} | {' | '.join(cells)} | "
                   f"{d['guidance_scale'] or 1} |")
    for task, r in drawn.items():
      if r.get('drawing_grid'):
        lines += ['', f'{task} (one row per requested digit):', '',
                  f"![{task}]({os.path.basename(r['drawing_grid'])})"]
  lines += ['', '## Loss by predicted modality (packed evaluation batches)', '',
            '| modality | loss | perplexity | accuracy | tokens |', '|---|---|---|---|---|']
  present = [name for name in MODALITY_NAMES if f'{name}/loss' in overall]
  for name in present:
    lines.append(f"| {name} | {overall[f'{name}/loss']:.4f} | "
                 f"{overall[f'{name}/perplexity']:.2f} | {overall[f'{name}/accuracy']:.1%} | "
                 f"{int(overall[f'{name}/tokens'])} |")
  # The total row only adds something over several modalities: with one it
  # repeats that modality's row.
  if len(present) != 1:
    lines.append(f"| all | {overall['loss']:.4f} | {overall['perplexity']:.2f} | "
                 f"{overall['accuracy']:.1%} | {int(overall['tokens'])} |")
  for p in plots:
    lines += ['', f'![{os.path.basename(p)}]({os.path.basename(p)})']
  path = os.path.join(out_dir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path
