"""Resume, re-mesh, fine-tune and checkpoint error paths through the real Trainer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gemjax.config import load_config
from gemjax.data import registry as data_registry
from gemjax.data import simple
from gemjax.batch import text_batch
from gemjax.errors import CheckpointError
from gemjax.train import checkpoint as ckpt_lib
from gemjax.train.loop import EXIT_NONFINITE, Trainer

TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=256', 'train.batch_size=8', 'train.seq_len=32',
        'train.log_every=1', 'train.progress_bar=false', 'train.tensorboard=false',
        'optimizer.warmup_steps=2', 'optimizer.decay_steps=6', 'checkpoint.every=3']


def _cfg(run_dir, *extra):
  return load_config(None, TINY + [f'train.run_dir={run_dir}', *extra])


def _losses(run_dir):
  rows = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows}


def _params(trainer):
  return jax.tree.map(np.asarray, trainer.state['params'])


def _train(cfg):
  trainer = Trainer.create(cfg)
  code = trainer.run()
  trainer.checkpointer.close()
  return trainer, code


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT_LM = os.path.join(ROOT, 'data', 'sample', 'train', 'text_lm-*')
# A shuffled Grain pipeline over real shards: the data position is state that
# has to come back from the checkpoint (a stateless source would hide a loss).
GRAIN_RUN = ['data.source=grain', f'data.datasets=[{{path: "{TEXT_LM}"}}]',
             'data.image_patches=0', 'data.audio_patches=0', 'model.vocab_size=384']


def _train_in_subprocess(run_dir, steps, *, kill_after_logged=None):
  """train.py in a child process (1 device); with `kill_after_logged`, SIGKILL
  it as soon as that many steps are logged. Returns the exit code."""
  args = TINY + GRAIN_RUN + [f'train.run_dir={run_dir}', f'train.steps={steps}',
                             'checkpoint.every=10', 'optimizer.decay_steps=0']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  if kill_after_logged is not None:
    metrics, deadline = run_dir / 'metrics.jsonl', time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_logged:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.01)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
  return proc.returncode, args


def _last_losses(run_dir):
  out = {}
  for line in open(os.path.join(run_dir, 'metrics.jsonl')):
    r = json.loads(line)
    out[r['step']] = r['loss']     # a resumed run logs the replayed steps again: keep the last
  return out


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run_bitwise(tmp_path):
  """A real kill: the child is SIGKILLed mid-run (between or during a step, an
  async checkpoint possibly half written); a new process resumes from the last
  complete checkpoint, and its losses and final parameters equal the
  uninterrupted run's bit for bit."""
  steps = 120
  code, _ = _train_in_subprocess(tmp_path / 'a', steps)
  assert code == 0
  code, args = _train_in_subprocess(tmp_path / 'b', steps, kill_after_logged=25)
  assert code == -signal.SIGKILL, 'the run ended before it could be killed'
  saved = sorted(int(p) for p in os.listdir(tmp_path / 'b') if p.isdigit())
  assert saved and 10 <= max(saved) < steps
  killed_at = max(_last_losses(tmp_path / 'b'))
  assert killed_at < steps
  code, _ = _train_in_subprocess(tmp_path / 'b', steps)
  assert code == 0
  a, b = _last_losses(tmp_path / 'a'), _last_losses(tmp_path / 'b')
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  assert a == b      # every step, including the ones after the resume
  finals = []
  for run in ('a', 'b'):
    trainer = Trainer.create(load_config(None, [x if not x.startswith('train.run_dir=') else
                                                f'train.run_dir={tmp_path / run}'
                                                for x in args]))
    assert trainer.start_step == steps
    finals.append(_params(trainer))
    trainer.checkpointer.close()
  for x, y in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    assert np.array_equal(x, y)


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
  saved, _ = _train(_cfg(tmp_path, 'train.steps=3', 'mesh.data=1', 'mesh.fsdp=8'))
  other = Trainer.create(_cfg(tmp_path, 'train.steps=3', 'mesh.data=4', 'mesh.tensor=2'))
  assert other.start_step == 3
  wq = other.state['params']['layers']['blocks'][0]['attn']['wq_DxHxK']
  assert dict(wq.sharding.mesh.shape)['tensor'] == 2 and 'tensor' in str(wq.sharding.spec)
  for x, y in zip(jax.tree.leaves(_params(saved)), jax.tree.leaves(_params(other))):
    assert np.array_equal(x, y)
  other.checkpointer.close()


@pytest.mark.slow
def test_init_from_loads_params_only_with_fresh_optimizer(tmp_path):
  base, _ = _train(_cfg(tmp_path / 'base', 'train.steps=3'))
  ft = Trainer.create(_cfg(tmp_path / 'ft', 'train.steps=3',
                           f'checkpoint.init_from={tmp_path / "base"}'))
  assert ft.start_step == 0 and int(ft.state['step']) == 0
  for x, y in zip(jax.tree.leaves(_params(base)), jax.tree.leaves(_params(ft))):
    assert np.array_equal(x, y)
  mu = ft.state['opt_state'][1][0].mu
  assert all(float(np.abs(np.asarray(m)).max()) == 0 for m in jax.tree.leaves(mu))
  ft.checkpointer.close()


@pytest.mark.slow
def test_checkpoint_errors_name_path_and_mismatch(tmp_path):
  _train(_cfg(tmp_path / 'run', 'train.steps=3'))
  with pytest.raises(CheckpointError, match='does not exist'):
    Trainer.create(_cfg(tmp_path / 'x', f'checkpoint.init_from={tmp_path / "missing"}'))
  # A model of another width: the error names the parameter and both shapes.
  with pytest.raises(CheckpointError, match=r'embedding_VxD has shape \(256, 32\).*\(256, 48\)'):
    Trainer.create(_cfg(tmp_path / 'run', 'model.d_model=48'))
  # A partial checkpoint (state item lost) is an error, not a fresh start.
  shutil.rmtree(tmp_path / 'run' / '3' / 'state')
  with pytest.raises(CheckpointError, match="partial: item 'state' is missing"):
    Trainer.create(_cfg(tmp_path / 'run'))
  # Only an unfinished (tmp) save in the run dir: also an error.
  os.makedirs(tmp_path / 'only_tmp' / '5.orbax-checkpoint-tmp-123')
  with pytest.raises(CheckpointError, match='only partial'):
    Trainer.create(_cfg(tmp_path / 'only_tmp'))


@data_registry.register_source('nan_test')
def _nan_source(cfg, split, process_index, process_count):
  def make(step):
    b = text_batch(np.ones((cfg.train.batch_size, cfg.train.seq_len), np.int32))
    b['loss_weights'][:] = np.nan
    return b
  return simple.StepIterator(make)


def test_nonfinite_loss_skips_updates_and_stops_with_a_checkpoint(tmp_path):
  cfg = _cfg(tmp_path, 'train.steps=50', 'data.source=nan_test',
             'train.max_nonfinite_steps=3', 'checkpoint.every=100')
  trainer = Trainer.create(cfg)
  before = _params(trainer)
  assert trainer.run() == EXIT_NONFINITE
  trainer.checkpointer.close()
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(_params(trainer))):
    assert np.array_equal(x, y)
  steps = [int(p) for p in os.listdir(tmp_path) if p.isdigit()]
  assert steps and max(steps) <= 5




def test_resume_with_other_num_workers_is_an_error_naming_the_key(tmp_path):
  # Grain splits the data between worker processes, so a saved position is only
  # valid for the same worker count: 0 -> 1 used to fail inside Grain
  # (KeyError), and 1 -> 2 to resume silently from the wrong place.
  grain_run = GRAIN_RUN + ['train.steps=3']
  _train(_cfg(tmp_path, *grain_run, 'data.num_workers=0'))
  with pytest.raises(CheckpointError, match=r'/3\b.*saved with data\.num_workers=0.*'
                                            r'this run sets data\.num_workers=1'):
    Trainer.create(_cfg(tmp_path, *grain_run, 'data.num_workers=1'))
  # The same worker count resumes at the saved data position.
  resumed = Trainer.create(_cfg(tmp_path, *grain_run, 'data.num_workers=0'))
  assert resumed.start_step == 3 and resumed.data_iter.stats['batches'] == 3
  next(resumed.data_iter)
  resumed.checkpointer.close()
