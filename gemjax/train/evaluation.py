"""Held-out evaluation of a set of parameters: the packed eval-split loss and
teacher-forced task accuracy, each with one compiled forward that is reused.

Shared by the training loop (`eval.every`: `TrainingEval`, on the current
parameters, cheap) and eval.py (gemjax/eval/run.py and gemjax/eval/tasks.py
add generation, drawing and the report on top). It lives in train/ because
the loop may not import eval/ (imports run one way, DESIGN.md section 3).
Imports data/ for the eval split, the records and the sequence builder, and
the model through train's state.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemjax.batch import MODALITY_NAMES, patch_budgets
from gemjax.data import records as records_lib
from gemjax.data import registry as data_registry
from gemjax.errors import BadInputError, GemjaxError
from gemjax.parallel import sharding as shd
from gemjax.train import state as state_lib

log = logging.getLogger('gemjax')


# ------------------------------------------------------- loss (packed batches)


class LossEval:
  """Loss, perplexity and accuracy, overall and per predicted modality, over
  the first `batches` packed batches of the eval split. The eval iterator is
  rebuilt in order at every call, so every call sees the same batches; the
  eval step is compiled at the first call and reused."""

  def __init__(self, cfg, mdef: state_lib.ModelDef, mesh):
    self.cfg, self.mesh = cfg, mesh
    self.batches = cfg.eval.batches
    self.eval_fn = jax.jit(state_lib.make_eval_step(mdef, cfg.model))
    self._shards = None

  def __call__(self, params) -> dict[str, Any]:
    it = data_registry.make_iterator(self.cfg, 'eval', jax.process_index(),
                                     jax.process_count())
    totals: dict[str, float] = collections.defaultdict(float)
    aux_sums: dict[str, np.ndarray] = {}
    n_batches = 0
    with shd.use_mesh(self.mesh):
      for _ in range(self.batches):
        try:
          batch = next(it)
        except StopIteration:   # a finite eval split ended early
          break
        if self._shards is None:
          self._shards = state_lib.batch_shardings(
              self.mesh, {k: v.ndim for k, v in batch.items()})
        m = jax.device_get(self.eval_fn(params, state_lib.to_global(batch, self._shards)))
        n_batches += 1
        for k, v in m.items():
          if k.startswith('aux/moe_load'):
            aux_sums[k] = aux_sums.get(k, 0) + np.asarray(v)
        w = float(m['weight_sum'])
        totals['nll_sum'] += float(m['nll']) * w
        totals['correct_sum'] += float(m['accuracy']) * w
        totals['weight_sum'] += w
        for name in MODALITY_NAMES:
          for k in ('nll_sum', 'correct_sum', 'weight_sum'):
            totals[f'{k}/{name}'] += float(m[f'{k}/{name}'])
    if not n_batches:
      raise GemjaxError('the evaluation split produced no batches')
    return loss_report(totals, aux_sums, n_batches)


def loss_report(totals: Mapping[str, float], aux_sums: Mapping[str, np.ndarray],
                n_batches: int) -> dict[str, Any]:
  """Summed eval-step metrics -> {tokens, loss, perplexity, accuracy,
  <modality>/{loss, perplexity, accuracy, tokens}, _aux}."""
  report: dict[str, Any] = {'tokens': totals['weight_sum']}
  nll = totals['nll_sum'] / max(totals['weight_sum'], 1e-9)
  report.update(loss=nll, perplexity=math.exp(min(nll, 50)),
                accuracy=totals['correct_sum'] / max(totals['weight_sum'], 1e-9))
  for name in MODALITY_NAMES:
    w = totals[f'weight_sum/{name}']
    if w > 0:
      loss = totals[f'nll_sum/{name}'] / w
      report[f'{name}/loss'] = loss
      report[f'{name}/perplexity'] = math.exp(min(loss, 50))
      report[f'{name}/accuracy'] = totals[f'correct_sum/{name}'] / w
      report[f'{name}/tokens'] = w
  if aux_sums:
    report['_aux'] = {k: v / n_batches for k, v in aux_sums.items()}
  return report


# --------------------------------------------- tasks (one record per row)


def iter_records(path: str, kind: str = 'auto') -> Iterable[tuple[str, dict | None]]:
  """(where, record) for every record of a dataset, in order; record None
  when it cannot be read."""
  from gemjax.data import sources
  src = sources.open_source(kind, path)
  for i in range(len(src)):
    item = src[i]
    where = item.get('where', f'{path}:{i}')
    if 'error' in item:
      yield where, None
      continue
    rec = item['record']
    if isinstance(rec, (bytes, bytearray, memoryview)):
      rec = records_lib.decode_record(bytes(rec), where)
    yield where, rec


def iter_task_records(datasets: Iterable[Any], max_records: int = 0
                      ) -> Iterator[tuple[str, str, dict | None]]:
  """(task, where, record) for the first `max_records` records (0 = all) of
  each dataset; the task is the record's `task`, else the file-name prefix."""
  for spec in datasets:
    for count, (where, rec) in enumerate(iter_records(spec.path, spec.kind)):
      if max_records and count >= max_records:
        break
      yield (rec or {}).get('task') or os.path.basename(spec.path).split('-')[0], where, rec


def answer_stats(logits_BxTxV, batch) -> dict[str, jax.Array]:
  """Per row: answer nll and correct-token sums, answer length, and whether
  every answer token is the argmax (teacher-forced exact match)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  w = batch['loss_weights'] > 0
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]
  correct = jnp.argmax(logits_BxTxV, axis=-1) == batch['targets']
  n = w.sum(axis=1)
  return {
      'nll_sum': jnp.where(w, nll, 0.0).sum(axis=1),
      'correct_sum': jnp.where(w, correct, False).sum(axis=1),
      'answer_tokens': n,
      'exact': jnp.all(correct | ~w, axis=1) & (n > 0),
  }


def _answer_forward(graphdef, params, batch):
  logits, _, _ = nnx.merge(graphdef, params)(batch)
  return answer_stats(logits, batch)


class TaskScorer:
  """Teacher-forced answer statistics per task, one record per row in
  batches of `batch_size` rows of `seq_len` tokens (a short last batch is
  padded with copies that are not counted), so every batch has one shape and
  the forward compiles once."""

  def __init__(self, builder, mdef: state_lib.ModelDef, mesh, *, seq_len: int,
               budgets: Mapping[str, int], batch_size: int):
    self.builder, self.mesh = builder, mesh
    self.seq_len, self.budgets, self.batch_size = seq_len, dict(budgets), batch_size
    self.forward = jax.jit(functools.partial(_answer_forward, mdef.graphdef))
    self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def collate(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    examples = list(examples)
    if not 0 < len(examples) <= self.batch_size:
      raise ValueError(f'{len(examples)} examples for a batch of {self.batch_size} rows')
    examples += [examples[0]] * (self.batch_size - len(examples))
    return self.builder.collate(examples, self.seq_len, self.budgets, truncate=True)

  def score(self, params, tasks: Sequence[str], batch: Mapping[str, np.ndarray]) -> None:
    """Adds the first len(tasks) rows of `batch` to the counts of their tasks."""
    with shd.use_mesh(self.mesh):
      stats = jax.device_get(self.forward(params, batch))
    for i, task in enumerate(tasks):
      c = self.counts[task]
      c['records'] += 1
      c['exact'] += int(stats['exact'][i])
      c['correct'] += int(stats['correct_sum'][i])
      c['answer_tokens'] += int(stats['answer_tokens'][i])
      c['nll'] += float(stats['nll_sum'][i])

  def bad(self, task: str) -> None:
    self.counts[task]['bad'] += 1

  def results(self) -> dict[str, dict[str, Any]]:
    """task -> {records, bad, exact_match, token_accuracy, loss}."""
    out = {}
    for task, c in sorted(self.counts.items()):
      n, toks = max(c['records'], 1), max(c['answer_tokens'], 1)
      out[task] = {'records': c['records'], 'bad': c['bad'],
                   'exact_match': c['exact'] / n, 'token_accuracy': c['correct'] / toks,
                   'loss': c['nll'] / toks}
    return out


# ------------------------------------------------------- during training


class TrainingEval:
  """`eval.every`: the eval-split loss (`eval.batches` packed batches) and,
  on Grain data, teacher-forced task accuracy on the first
  `eval.train_max_records` records of each eval dataset, on the parameters
  it is given. Teacher-forced only (generation is eval.py's). The task
  records are read and tokenized once, at the first call, and kept as
  examples (collated per call: a padded batch holds every modality's patch
  budget, its example only its own patches); both forwards compile once.

  Returns flat scalars for the metric writer: loss, perplexity, accuracy,
  tokens, loss/<modality>, accuracy/<modality> (the training rows' names),
  <task>/{exact_match, token_accuracy, loss}, time_s.
  """

  def __init__(self, cfg, mdef: state_lib.ModelDef, mesh):
    self.cfg, self.mdef, self.mesh = cfg, mdef, mesh
    self.loss = LossEval(cfg, mdef, mesh)
    self.scorer: TaskScorer | None = None
    self._examples: list[tuple[str, dict]] | None = None

  def _tasks_ready(self) -> None:
    if self._examples is not None:
      return
    self._examples = []
    cfg = self.cfg
    if cfg.data.source != 'grain':
      return
    builder = data_registry.sequence_builder(cfg)
    self.scorer = TaskScorer(builder, self.mdef, self.mesh, seq_len=cfg.train.seq_len,
                             budgets=patch_budgets(cfg.data),
                             batch_size=cfg.eval.task_batch_size)
    for task, where, rec in iter_task_records(cfg.data.eval_datasets or cfg.data.datasets,
                                              cfg.eval.train_max_records):
      try:
        if rec is None:
          raise BadInputError('record', where, 'unreadable record')
        self._examples.append((task, builder.build(rec, source=where)))
      except BadInputError as e:
        log.warning('eval.every: skipping a %s record: %s', task, e)

  def __call__(self, params) -> dict[str, float]:
    t0 = time.perf_counter()
    report = self.loss(params)
    out = {k: float(report[k]) for k in ('loss', 'perplexity', 'accuracy', 'tokens')}
    for name in MODALITY_NAMES:
      if f'{name}/loss' in report:
        out[f'loss/{name}'] = report[f'{name}/loss']
        out[f'accuracy/{name}'] = report[f'{name}/accuracy']
    self._tasks_ready()
    if self.scorer is not None:
      self.scorer.counts.clear()
      n = self.scorer.batch_size
      for i in range(0, len(self._examples), n):
        chunk = self._examples[i:i + n]
        self.scorer.score(params, [t for t, _ in chunk],
                          self.scorer.collate([ex for _, ex in chunk]))
      for task, r in self.scorer.results().items():
        out.update({f'{task}/{k}': r[k] for k in ('exact_match', 'token_accuracy', 'loss')})
    out['time_s'] = time.perf_counter() - t0
    return out


def format_eval_line(step: int, scalars: Mapping[str, float]) -> str:
  """One console line for an evaluation during training."""
  parts = [f"eval step {step}: loss {scalars['loss']:.4f} ppl {scalars['perplexity']:.2f}"]
  mods = [f"{name} {scalars[f'loss/{name}']:.3f}" for name in MODALITY_NAMES
          if f'loss/{name}' in scalars]
  if len(mods) > 1:
    parts.append('loss by modality: ' + ' '.join(mods))
  tasks = [f"{k[:-len('/exact_match')]} {v:.0%}" for k, v in scalars.items()
           if k.endswith('/exact_match')]
  if tasks:
    parts.append('tf exact match: ' + ' '.join(tasks))
  return ' | '.join(parts) + f" ({scalars['time_s']:.1f} s)"
