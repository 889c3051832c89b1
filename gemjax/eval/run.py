"""Evaluation: `python eval.py [CONFIG.yaml] [section.key=value ...]`.

Loads the parameters of a checkpoint (`eval.checkpoint`, default the run
directory) and reports loss and perplexity, overall and per modality, on the
evaluation split; writes `eval.json` and `eval.md` under `eval.out_dir`.
The config saved with the checkpoint rebuilds the model, so a bare
`python eval.py eval.checkpoint=runs/nano` works; the command line may still
override the mesh and the data (e.g. a different eval file).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

import jax
import numpy as np

from gemjax import config as config_lib
from gemjax.batch import MODALITY_NAMES
from gemjax.errors import GemjaxError
from gemjax.train import checkpoint as ckpt_lib
from gemjax.train import evaluation
from gemjax.train.loop import maybe_initialize_distributed, setup_logging
from gemjax.train.restore import load_for_eval, resolve_config  # noqa: F401  (public here too)

log = logging.getLogger('gemjax')


def evaluate(cfg: config_lib.Config, params=None, mesh=None, mdef=None) -> dict:
  """Loss/perplexity over `eval.batches` batches of the eval split
  (gemjax/train/evaluation.py, shared with evaluation during training)."""
  if params is None:
    params, mdef, mesh = load_for_eval(cfg)
  return evaluation.LossEval(cfg, mdef, mesh)(params)


def write_report(report: dict, out_dir: str, title: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
    json.dump(report, f, indent=2)
  lines = [f'# {title}', '', '| metric | value |', '|---|---|']
  lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |'
            for k, v in report.items()]
  with open(os.path.join(out_dir, 'eval.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main(argv: Sequence[str] | None = None) -> int:
  setup_logging()
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ('-h', '--help'):
    print(__doc__)
    print('usage: python eval.py [CONFIG.yaml] [section.key=value ...] [--print-config]')
    return 0
  # --print-config: the config eval would use (the checkpoint's, with the
  # command line on top) as YAML, then exit.
  print_config = '--print-config' in argv
  argv = [a for a in argv if a != '--print-config']
  path = argv.pop(0) if argv and '=' not in argv[0] else None
  try:
    cfg = resolve_config(path, argv)
    if print_config:
      print(config_lib.to_yaml(cfg), end='')
      return 0
    maybe_initialize_distributed(cfg.mesh)
    params, mdef, mesh = load_for_eval(cfg)
    report = evaluate(cfg, params, mesh, mdef)
    aux = report.pop('_aux', {})
    step_dir = ckpt_lib.resolve_step_dir(cfg.eval.checkpoint)
    run_dir = str(step_dir.parent)
    out_dir = cfg.eval.out_dir or os.path.join(run_dir, 'eval')
    os.makedirs(out_dir, exist_ok=True)
    tasks = {}
    if cfg.data.source == 'grain':
      from gemjax.eval import tasks as tasks_lib
      specs = cfg.data.eval_datasets or cfg.data.datasets
      tasks = tasks_lib.evaluate_tasks(cfg, params, mdef, mesh, specs,
                                       batch_size=cfg.eval.task_batch_size,
                                       max_records=cfg.eval.max_records,
                                       by_generation=cfg.eval.generate,
                                       out_dir=out_dir if jax.process_index() == 0 else None)
      report['tasks'] = tasks
    passkey = None
    if cfg.data.source == 'passkey':
      from gemjax.eval import passkey as passkey_lib
      lengths = list(cfg.eval.passkey_lengths) or [cfg.train.seq_len * f for f in (1, 2, 4, 8)]
      passkey = passkey_lib.evaluate_passkey(
          params, mdef, lengths=lengths, samples=cfg.eval.passkey_samples, mesh=mesh,
          by_generation=cfg.eval.generate,
          out_dir=out_dir if jax.process_index() == 0 else None,
          train_length=cfg.train.seq_len)
      report['passkey'] = {'depths': passkey['depths'], 'lengths': passkey['lengths'],
                           'exact_match': np.asarray(passkey['exact_match']).tolist()}
      if passkey.get('generated_exact_match') is not None:
        report['passkey']['generated_exact_match'] = np.asarray(
            passkey['generated_exact_match']).tolist()
  except GemjaxError as e:
    log.error('%s', e)
    return 2
  if jax.process_index() == 0:
    write_report({k: v for k, v in report.items() if k != 'tasks'}, out_dir,
                 f'Evaluation of {cfg.eval.checkpoint}')
    with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
      json.dump(report, f, indent=2)
    plots = []
    from gemjax.eval import tasks as tasks_lib
    curve = os.path.join(out_dir, 'loss_curves.png')
    if tasks_lib.plot_loss_curves(tasks_lib.read_metrics(run_dir), curve):
      plots.append(curve)
    if aux:
      from gemjax.eval import moe_plots
      from gemjax.model.spec import decoder_spec
      load, layers = moe_plots.expert_load_from_metrics(
          {k[len('aux/'):]: v for k, v in aux.items()},
          period=len(decoder_spec(cfg.model).period))
      plots.append(moe_plots.plot_expert_load(load, os.path.join(out_dir, 'expert_load.png'),
                                              layers=layers))
    if passkey is not None:
      plots += [p for p in passkey['files'] if p.endswith('.png')]
      print('passkey exact match (rows: depth, columns: length in bytes):')
      print(passkey['markdown'])
    md = tasks_lib.write_task_report(out_dir, f'Evaluation of {step_dir}', report, tasks, plots)
    if tasks:
      print('task accuracy (exact match of the answer, test split; generated = greedy '
            'decoding with the KV cache, tf = teacher-forced):')
      for task, r in tasks.items():
        if 'drawing' in r:
          d = r['drawing']
          parts = [f"{k.replace('_', ' ')} {d[k]:6.1%}" for k in
                   ('well_formed', 'drawn_as_requested', 'named_as_drawn') if k in d]
          print(f"  {task:>14}: drawn: {', '.join(parts)}  ({d['records']} records, "
                f"guidance {d['guidance_scale'] or 1}; grid {r.get('drawing_grid', '-')})")
          if not r['records']:
            continue
        g = r.get('generated_exact_match')
        gen = f'generated {g:6.1%}, ' if g is not None else ''
        # A drawn answer is judged as an image above: an exact match of its
        # codes under teacher forcing says nothing, its code loss does.
        exact = '' if 'drawing' in r else f"tf {r['exact_match']:6.1%}  "
        print(f"  {task:>14}: {gen}{exact}({r['records']} records, "
              f"{'teacher-forced ' if 'drawing' in r else ''}answer token accuracy "
              f"{r['token_accuracy']:.1%}, loss {r['loss']:.3f})")
    print(f"eval: loss {report['loss']:.4f}  perplexity {report['perplexity']:.2f}  "
          f"accuracy {report['accuracy']:.3f}  ({int(report['tokens'])} tokens)")
    for name in MODALITY_NAMES:
      if f'{name}/loss' in report:
        print(f"  {name:>10}: loss {report[f'{name}/loss']:.4f}  perplexity "
              f"{report[f'{name}/perplexity']:.2f}  accuracy {report[f'{name}/accuracy']:.3f}")
    print(f'report: {md}')
  return 0
