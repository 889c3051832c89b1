"""Evaluation during training (`eval.every`) through the real Trainer on a tiny
Grain run over the sample shards, and the report's curves and tables."""

import json
import math

import jax
import numpy as np
import pytest

from gemjax.config import load_config
from gemjax.eval import tasks as tasks_lib
from gemjax.train import evaluation
from gemjax.train import loop as loop_lib

TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=384', 'train.batch_size=8', 'train.seq_len=32',
        'train.log_every=1', 'train.progress_bar=false', 'train.tensorboard=false',
        'optimizer.warmup_steps=2', 'checkpoint.every=100', 'train.steps=5',
        'train.peak_flops=1e9']
# Text and a digit task (image in, text answer); the eval split is the test shards.
GRAIN = ['data.source=grain', 'data.audio_patches=0', 'data.image_patches=8',
         'data.datasets=[{path: "data/sample/train/text_lm-*"}, '
         '{path: "data/sample/train/image_digit-*"}]',
         'data.eval_datasets=[{path: "data/sample/test/text_lm-*"}, '
         '{path: "data/sample/test/image_digit-*"}]']
EVAL = ['eval.every=2', 'eval.batches=2', 'eval.train_max_records=6', 'eval.task_batch_size=4']
TASKS = ('image_digit', 'text_lm')


def _rows(run_dir):
  return [json.loads(l) for l in open(run_dir / 'metrics.jsonl')]


def _train(run_dir, extra, evaluators=None):
  """A real Trainer run of TINY + GRAIN + extra; with `evaluators`, the
  TrainingEval the loop builds is appended to it."""

  class Recording(evaluation.TrainingEval):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      evaluators.append(self)

  cfg = load_config(None, TINY + GRAIN + list(extra) + [f'train.run_dir={run_dir}'])
  with pytest.MonkeyPatch.context() as mp:
    if evaluators is not None:
      mp.setattr(loop_lib.eval_lib, 'TrainingEval', Recording)
    # No checkpoints: saving takes no part in this, and a first save compiles
    # hundreds of small slices (seconds on 2 shared cores).
    mp.setattr(loop_lib.Trainer, 'save', lambda self, step, force=False: False)
    trainer = loop_lib.Trainer.create(cfg)
    assert trainer.run() == 0
  trainer.checkpointer.close()
  return cfg, trainer


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """5 steps with eval.every=2, and the one evaluator the loop built."""
  run_dir = tmp_path_factory.mktemp('train_eval') / 'eval'
  built = []
  cfg, trainer = _train(run_dir, EVAL, built)
  assert len(built) == 1
  return {'cfg': cfg, 'trainer': trainer, 'dir': run_dir, 'evaluator': built[0]}


def test_eval_every_logs_eval_rows_at_every_nth_and_the_last_step(run):
  cfg, trainer, run_dir = run['cfg'], run['trainer'], run['dir']
  rows = [r for r in _rows(run_dir) if r['split'] == 'eval']
  assert [r['step'] for r in rows] == [2, 4, 5]
  for r in rows:
    assert 0 < r['loss'] < 2 * math.log(cfg.model.vocab_size)
    assert r['perplexity'] == pytest.approx(math.exp(r['loss']))
    assert 0 <= r['accuracy'] <= 1 and r['tokens'] > 0 and r['time_s'] > 0
    # Answers are text only here: the per-modality loss is the text loss.
    assert r['loss/text'] == pytest.approx(r['loss'])
    for task in TASKS:
      assert 0 <= r[f'{task}/exact_match'] <= 1 and 0 <= r[f'{task}/token_accuracy'] <= 1
      assert r[f'{task}/loss'] > 0
  assert rows[0]['loss'] != rows[-1]['loss']     # the parameters moved between evals
  # The last row is the final parameters: their eval loss, and their task
  # scores as eval.py's streamed task loop gets them (the evaluator instead
  # keeps the examples it tokenized at its first call).
  params = trainer.state['params']
  assert rows[-1]['loss'] == pytest.approx(run['evaluator'].loss(params)['loss'], rel=1e-6)
  tasks = tasks_lib.evaluate_tasks(cfg, params, trainer.mdef, trainer.mesh,
                                   cfg.data.eval_datasets, batch_size=4, max_records=6,
                                   by_generation=False)
  assert sorted(tasks) == list(TASKS)
  for task in TASKS:
    assert tasks[task]['records'] == 6
    for k in ('exact_match', 'token_accuracy', 'loss'):
      assert rows[-1][f'{task}/{k}'] == pytest.approx(tasks[task][k], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_training_losses_bitwise_equal_with_and_without_eval_every(run, tmp_path):
  built = []
  _, plain = _train(tmp_path / 'plain', [], built)
  assert not built      # eval.every=0 (the default) builds no evaluator
  losses = {}
  for name, run_dir in (('plain', tmp_path / 'plain'), ('eval', run['dir'])):
    train = [r for r in _rows(run_dir) if r['split'] == 'train']
    losses[name] = {r['step']: (r['loss'], r['grad_norm']) for r in train}
  assert sorted(losses['plain']) == [1, 2, 3, 4, 5]
  assert losses['plain'] == losses['eval']
  for x, y in zip(jax.tree.leaves(plain.state['params']),
                  jax.tree.leaves(run['trainer'].state['params'])):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_repeated_evals_reuse_one_compiled_forward(run):
  ev = run['evaluator']
  # Three evaluations (steps 2, 4, 5): one trace/compile of each forward.
  assert ev.loss.eval_fn._cache_size() == 1
  assert ev.scorer.forward._cache_size() == 1


def test_loss_curves_draw_the_eval_curve_next_to_the_training_loss(run, tmp_path):
  rows = tasks_lib.read_metrics(str(run['dir']))
  series = tasks_lib.loss_series(rows)
  train = [r for r in rows if r['split'] == 'train']
  # The cross-entropy on both sides (the train 'loss' also holds the z-loss).
  assert series['train'] == ([1, 2, 3, 4, 5], [r['nll'] for r in train])
  assert series['eval'][0] == [2, 4, 5] and series['eval text'][0] == [2, 4, 5]
  evals = [r for r in rows if r['split'] == 'eval']
  assert series['eval'][1] == [r['loss'] for r in evals]
  assert sorted(tasks_lib.eval_task_series(rows)) == list(TASKS)
  assert tasks_lib.plot_loss_curves(rows, str(tmp_path / 'curves.png'))
  assert (tmp_path / 'curves.png').stat().st_size > 0
  # Rows without evaluations (eval.every=0) draw the training curves only.
  assert not [k for k in tasks_lib.loss_series(train) if k.startswith('eval')]
  assert not tasks_lib.eval_task_series(train)


def test_report_modality_table_has_no_all_row_repeating_the_only_modality(run, tmp_path):
  text_only = run['evaluator'].loss(run['trainer'].state['params'])
  assert [k for k in text_only if k.endswith('/loss')] == ['text/loss']
  md = open(tasks_lib.write_task_report(str(tmp_path), 't', text_only, {}, [])).read()
  assert '| text |' in md and '| all |' not in md
  # With several modalities the total row says something new and stays.
  two = dict(text_only, **{'image_code/loss': 2.0, 'image_code/perplexity': math.exp(2.0),
                           'image_code/accuracy': 0.5, 'image_code/tokens': 10.0})
  md = open(tasks_lib.write_task_report(str(tmp_path), 't', two, {}, [])).read()
  assert '| image_code |' in md and f"| all | {text_only['loss']:.4f} |" in md
