"""SIGTERM (TPU preemption) in a real subprocess: checkpoint saved, exit code 0."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gemjax.config import load_config
from gemjax.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=256', 'train.batch_size=8', 'train.seq_len=32',
        'train.log_every=1', 'train.progress_bar=false', 'train.tensorboard=false']


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_zero(tmp_path):
  run_dir = tmp_path / 'run'
  args = TINY + [f'train.run_dir={run_dir}', 'train.steps=100000', 'checkpoint.every=100000']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = run_dir / 'metrics.jsonl'
  deadline = time.time() + 120
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    if proc.poll() is not None:
      pytest.fail(f'trainer exited early: {proc.stdout.read().decode()[-2000:]}')
    time.sleep(0.2)
  else:
    proc.kill()
    pytest.fail('trainer did not start within 120 s')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out.decode()[-2000:]
  assert b'preemption signal' in out
  steps = sorted(int(p) for p in os.listdir(run_dir) if p.isdigit())
  assert len(steps) == 1 and steps[0] >= 3
  last_logged = max(json.loads(l)['step'] for l in metrics.read_text().splitlines())
  assert steps[0] >= last_logged
  # The saved step is a complete checkpoint that a new run resumes from.
  trainer = Trainer.create(load_config(None, args))
  assert trainer.start_step == steps[0]
  trainer.checkpointer.close()
