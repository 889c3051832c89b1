"""Trains the passkey model of configs/passkey.yaml and evaluates the grid.

    python bench/passkey_train.py configs/passkey.yaml [key=value ...] \
        [--out runs/passkey] [--eval-lengths 256,512,1024,2048,4096]

Uses the library's train-state functions (model_def, make_optimizer,
init_state, make_train_step) on one device, logs loss and answer accuracy,
then writes the depth x length exact-match table (passkey.md) and heat map
(passkey.png) with `gemjax.eval.passkey.evaluate_passkey`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemjax.config import load_config
from gemjax.data import passkey as pk
from gemjax.data import registry as sources
from gemjax.eval.passkey import evaluate_passkey
from gemjax.parallel import sharding as shd
from gemjax.train import state as st


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('config')
  ap.add_argument('overrides', nargs='*')
  ap.add_argument('--out', default='runs/passkey')
  ap.add_argument('--eval-lengths', default='')
  ap.add_argument('--eval-samples', type=int, default=32)
  ap.add_argument('--log-every', type=int, default=50)
  args = ap.parse_args(argv)
  cfg = load_config(args.config, args.overrides)
  t = cfg.train
  mesh = shd.single_device_mesh()
  mdef = st.model_def(cfg.model)
  tx = st.optimizer_for(cfg, mdef)
  state = st.init_state(cfg.model, mdef, tx, mesh, t.seed)
  print(f'params: {st.param_count(mdef):,}', flush=True)
  schedule = st.lr_schedule(cfg.optimizer, t.steps)
  step_fn = st.make_train_step(mdef, tx, cfg.model, schedule)
  data = sources.make_iterator(cfg, 'train')
  shards = None
  os.makedirs(args.out, exist_ok=True)
  log = open(os.path.join(args.out, 'train_log.jsonl'), 'w')
  t0 = time.time()
  acc_window, loss_window = [], []
  with shd.use_mesh(mesh):
    jstep = jax.jit(step_fn, donate_argnums=(0,))
    for step in range(t.steps):
      batch = next(data)
      if shards is None:
        shards = st.batch_shardings(mesh, {k: v.ndim for k, v in batch.items()})
      state, m = jstep(state, st.to_global(batch, shards))
      loss_window.append(m['nll'])
      acc_window.append(m['accuracy'])
      if (step + 1) % args.log_every == 0 or step + 1 == t.steps:
        rec = {'step': step + 1, 'nll': float(np.mean(jax.device_get(loss_window))),
               'answer_digit_acc': float(np.mean(jax.device_get(acc_window))),
               'lr': float(m['learning_rate']), 'elapsed_s': round(time.time() - t0, 1)}
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + '\n')
        log.flush()
        acc_window, loss_window = [], []
  train_s = time.time() - t0
  lengths = [int(x) for x in args.eval_lengths.split(',')] if args.eval_lengths else \
      [t.seq_len // 4, t.seq_len // 2, t.seq_len, 2 * t.seq_len, 4 * t.seq_len, 8 * t.seq_len]
  t1 = time.time()
  res = evaluate_passkey(state['params'], mdef, lengths=lengths, samples=args.eval_samples,
                         out_dir=args.out, train_length=t.seq_len)
  print(res['markdown'])
  print(f'train {train_s:.0f}s, eval {time.time() - t1:.0f}s; wrote {res["files"]}')
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump({'train_seconds': train_s, 'steps': t.steps, 'lengths': lengths,
               'depths': res['depths'], 'exact_match': res['exact_match'].tolist()}, f)


if __name__ == '__main__':
  main()
