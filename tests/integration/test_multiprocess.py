"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo
collectives over 127.0.0.1) against 1 process x 8 devices, a killed or hung
peer, and SIGTERM on every process.

Each run is `train.py` in real subprocesses. Every wait has a deadline and
every child is killed in `finally`, so a hang fails the test instead of
blocking CI. Two speed-ups that do not change what is tested: the children
compile at XLA's lowest optimisation level (the reference run too, so like is
compared with like) and share a persistent compilation cache (process 0 reads
it; JAX lets only process 0 write it, so process 1 still compiles).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.train import checkpoint as ckpt_lib
from gemjax.train import loop
from gemjax.train import state as state_lib
from gemjax.train.loop import EXIT_PEER_LOST, PeerWatchdog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Nano-sized (the shapes of test_checkpoint's runs), synthetic data (a pure
# function of step and global row, so 2 x 4 rows and 1 x 8 rows are the same
# global batch); a fixed decay length makes the learning rate independent of
# train.steps, so runs of different lengths share one schedule.
TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=256', 'train.batch_size=8', 'train.seq_len=32',
        'train.log_every=1', 'train.progress_bar=false', 'train.tensorboard=false',
        'train.peak_flops=1e10', 'optimizer.warmup_steps=2', 'optimizer.decay_steps=20',
        'checkpoint.every=1000', 'mesh.data=2', 'mesh.fsdp=4', 'data.source=synthetic']
XLA_FAST = '--xla_backend_optimization_level=0'
STEPS = 20
# 2 x 4 and 1 x 8 run the same HLO, but gloo sums the 8 partial gradients in
# another order than XLA's in-process all-reduce: f32 rounding differs in the
# last bits (measured: up to 9e-8 relative on the loss, 1e-7 absolute on the
# parameters after 20 AdamW steps). 1e-5 is the suite's sharded-vs-reference
# tolerance; one missing or repeated step would move parameters by ~lr = 3e-3.
RTOL_LOSS, ATOL_PARAM = 1e-5, 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(cache_dir, devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {XLA_FAST}',
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


class Run:
  """Two train.py processes forming one 8-device mesh; logs to files."""

  def __init__(self, tmp_path, name: str, cache_dir, *args: str, heartbeat_s: int = 30):
    self.run_dir = tmp_path / 'run'
    self.logs = [tmp_path / f'{name}.{i}.log' for i in range(2)]
    port = _free_port()
    common = TINY + [f'train.run_dir={self.run_dir}', 'mesh.distributed=true',
                     f'mesh.coordinator_address=127.0.0.1:{port}', 'mesh.num_processes=2',
                     f'mesh.heartbeat_timeout_s={heartbeat_s}',
                     'mesh.initialization_timeout_s=60', *args]
    self.procs = []
    for i, log_path in enumerate(self.logs):
      with open(log_path, 'wb') as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'train.py'), *common, f'mesh.process_id={i}'],
            cwd=ROOT, env=_env(cache_dir, 4), stdout=f, stderr=subprocess.STDOUT))

  def log(self, i: int) -> str:
    return self.logs[i].read_text(errors='replace')

  def tail(self) -> str:
    return '\n'.join(f'--- process {i} (exit {p.poll()}):\n' + self.log(i)[-3000:]
                     for i, p in enumerate(self.procs))

  def wait_logged_steps(self, n: int, timeout: float = 150) -> None:
    metrics, deadline = self.run_dir / 'metrics.jsonl', time.time() + timeout
    while time.time() < deadline:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
        return
      if any(p.poll() is not None for p in self.procs):
        pytest.fail(f'a process exited before {n} steps were logged\n{self.tail()}')
      time.sleep(0.1)
    pytest.fail(f'{n} steps not logged within {timeout} s\n{self.tail()}')

  def wait(self, i: int, timeout: float) -> int | None:
    """Exit code of process i, or None if it is still running after `timeout`."""
    try:
      return self.procs[i].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      return None

  def finish(self, timeout: float = 150) -> list[int | None]:
    deadline = time.time() + timeout
    return [self.wait(i, max(0.1, deadline - time.time())) for i in range(2)]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)


def _train_reference(tmp_path, cache_dir, steps: int) -> str:
  """1 process x 8 devices, `steps` steps; returns its run dir."""
  run_dir = tmp_path / 'reference'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), *TINY, f'train.run_dir={run_dir}',
       f'train.steps={steps}'], cwd=ROOT, env=_env(cache_dir, 8),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=150)
  assert proc.returncode == 0, proc.stdout.decode()[-3000:]
  return run_dir


def _losses(run_dir) -> dict[int, float]:
  out = {}
  for line in open(os.path.join(run_dir, 'metrics.jsonl')):
    row = json.loads(line)
    out[row['step']] = row['loss']   # a resumed run may log a step again: keep the last
  return out


def _saved_steps(run_dir) -> list[int]:
  return sorted(int(p) for p in os.listdir(run_dir) if p.isdigit())


def _params(run_dir, step: int) -> list[np.ndarray]:
  """The parameters saved at `step`, restored in this (8-device) process.
  Parameters only: the data position is saved per process, so a whole
  2-process checkpoint resumes only with 2 processes."""
  cfg = load_config(None, TINY)
  mdef = state_lib.model_def(cfg.model)
  abstract = state_lib.abstract_state(mdef, state_lib.optimizer_for(cfg, mdef),
                                      loop.build_mesh(cfg))
  params = ckpt_lib.load_params(str(run_dir / str(step)), abstract['params'])
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.mark.slow
def test_two_processes_checkpoint_sigterm_and_resume_match_one_process(tmp_path, cache_dir):
  """2 processes x 4 devices, against 1 process x 8 devices:
  (1) train 3 steps and checkpoint; (2) resume, and SIGTERM both processes
  mid-run: both save the one step JAX's preemption sync picks, and exit 0;
  (3) resume from that step to the end. Every step's loss and the final
  parameters equal the 1 x 8 run's (to f32 reduction-order rounding)."""
  t0 = time.time()
  reference = _train_reference(tmp_path, cache_dir, STEPS)
  t_ref = time.time() - t0
  runs = []
  try:
    # (1) 3 steps, then the final checkpoint at step 3.
    runs.append(Run(tmp_path, 'first', cache_dir, 'train.steps=3'))
    assert runs[-1].finish() == [0, 0], runs[-1].tail()
    assert _saved_steps(tmp_path / 'run') == [3]
    # (2) Resume; SIGTERM both once two more steps are logged.
    runs.append(Run(tmp_path, 'preempted', cache_dir, f'train.steps={STEPS}'))
    run = runs[-1]
    run.wait_logged_steps(5)
    for p in run.procs:
      p.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == [0, 0], run.tail()
    saved = []
    for i in range(2):
      log = run.log(i)
      assert f'resuming from {tmp_path / "run"}/3' in log, run.tail()
      saved.append([int(line.rsplit('saving step ', 1)[1].split()[0])
                    for line in log.splitlines() if 'preemption signal: saving step' in line])
    assert len(saved[0]) == 1 and saved[0] == saved[1], f'saved {saved}\n{run.tail()}'
    step = saved[0][0]
    assert 5 <= step < STEPS
    # Exactly one new, complete step directory (no unfinished tmp directory).
    assert sorted(os.listdir(tmp_path / 'run')) == sorted(['3', str(step), 'metrics.jsonl'])
    # (3) Both processes resume from it and train to the end.
    runs.append(Run(tmp_path, 'resumed', cache_dir, f'train.steps={STEPS}'))
    assert runs[-1].finish() == [0, 0], runs[-1].tail()
    for i in range(2):
      assert f'resuming from {tmp_path / "run"}/{step}' in runs[-1].log(i)
  finally:
    for r in runs:
      r.kill()
  t_runs = time.time() - t0 - t_ref
  got_loss, want_loss = _losses(tmp_path / 'run'), _losses(reference)
  assert sorted(got_loss) == sorted(want_loss) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got_loss[s] for s in sorted(got_loss)],
                             [want_loss[s] for s in sorted(want_loss)], rtol=RTOL_LOSS)
  got, want = _params(tmp_path / 'run', STEPS), _params(reference, STEPS)
  assert len(got) == len(want)
  for x, y in zip(got, want):
    np.testing.assert_allclose(x, y, rtol=0, atol=ATOL_PARAM)
  loss_diff = max(abs(got_loss[s] / want_loss[s] - 1) for s in got_loss)
  param_diff = max(float(np.max(np.abs(x - y))) for x, y in zip(got, want))
  print(f'reference {t_ref:.0f} s, multi-process runs {t_runs:.0f} s; max relative loss '
        f'difference {loss_diff:.1e}, max parameter difference {param_diff:.1e}')


# The watchdog's verdict comes after HEARTBEAT_S, its exit about 1.5 s later,
# well before JAX's own heartbeat check (3 x HEARTBEAT_S + 10 s) would abort
# the survivor, and far before the ~70 s that JAX's defaults took.
HEARTBEAT_S = 5
BOUND_S = 30


@pytest.mark.slow
@pytest.mark.parametrize('how', ['kill', 'hang'])
def test_dead_or_hung_worker_makes_the_other_exit_with_a_clear_error(tmp_path, cache_dir, how):
  """kill -9 (or SIGSTOP: hung) process 1 mid-run: process 0 logs what
  happened and exits with code 4 within BOUND_S, instead of waiting in a
  collective until JAX aborts it. A kill is usually seen at once by the
  collective (gloo: connection reset); a hang only by the heartbeats."""
  run = Run(tmp_path, how, cache_dir, 'train.steps=100000', heartbeat_s=HEARTBEAT_S)
  try:
    run.wait_logged_steps(2)
    run.procs[1].send_signal(signal.SIGKILL if how == 'kill' else signal.SIGSTOP)
    t0 = time.time()
    code = run.wait(0, BOUND_S)
    elapsed = time.time() - t0
  finally:
    run.kill()
  assert code == EXIT_PEER_LOST, f'exit {code} after {elapsed:.0f} s\n{run.tail()}'
  log = run.log(0)
  if how == 'hang':
    assert (f'process 1 sent no heartbeat for {HEARTBEAT_S} s (mesh.heartbeat_timeout_s)'
            in log), log[-3000:]
  else:
    assert ('a cross-process collective failed' in log or
            'process 1 sent no heartbeat' in log), log[-3000:]
  assert 'Terminating process' not in log   # not JAX's abort
  print(f'{how}: process 0 exited {code} after {elapsed:.1f} s')


@pytest.mark.slow
def test_dead_coordinator_makes_the_other_abort_within_seconds(tmp_path, cache_dir):
  """The documented limit: when process 0 (which hosts JAX's coordination
  service) dies, JAX itself aborts the others (SIGABRT) as soon as their
  connection to it breaks, before gemjax can exit cleanly; the time is
  bounded and the log says why."""
  run = Run(tmp_path, 'coordinator', cache_dir, 'train.steps=100000',
            heartbeat_s=HEARTBEAT_S)
  try:
    run.wait_logged_steps(2)
    run.procs[0].send_signal(signal.SIGKILL)
    t0 = time.time()
    code = run.wait(1, BOUND_S)
    elapsed = time.time() - t0
  finally:
    run.kill()
  assert code is not None and code != 0, f'still running after {BOUND_S} s\n{run.tail()}'
  log = run.log(1)
  assert ('Terminating process because the JAX distributed service detected fatal errors'
          in log or 'a cross-process collective failed' in log), log[-3000:]
  print(f'coordinator killed: process 1 exited {code} after {elapsed:.1f} s')


# ------------------------------------------------------- the watchdog alone


class FakeClient:
  """The two key-value calls PeerWatchdog makes, on a dict."""

  def __init__(self):
    self.kv, self.fail = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.fail:
      raise RuntimeError('UNAVAILABLE: coordination service unreachable')
    self.kv[key] = value

  def key_value_dir_get(self, prefix):
    if self.fail:
      raise RuntimeError('UNAVAILABLE: coordination service unreachable')
    return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watchdog(client, pid, timeout_s):
  codes = []
  wd = PeerWatchdog(client, pid, 2, timeout_s, exit_fn=codes.append)
  wd.start()
  loop.atexit.unregister(wd.finish)
  return wd, codes


def _wait_for(codes, seconds):
  deadline = time.time() + seconds
  while not codes and time.time() < deadline:
    time.sleep(0.02)
  return codes


def test_watchdog_declares_a_silent_peer_dead_and_tells_the_others():
  client = FakeClient()
  wd0, codes0 = _watchdog(client, 0, 0.3)
  assert _wait_for(codes0, 5) == [EXIT_PEER_LOST]
  verdict = client.kv['gemjax/peer_lost/0']
  assert 'process 1 sent no heartbeat for 0.3 s (mesh.heartbeat_timeout_s)' in verdict
  # Process 1 (alive, but its peer gave up on it) reads the verdict and leaves.
  wd1, codes1 = _watchdog(client, 1, 0.3)
  assert _wait_for(codes1, 5) == [EXIT_PEER_LOST]
  for wd in (wd0, wd1):
    wd.stop()


def test_watchdog_spares_beating_finished_and_briefly_unreachable_peers():
  # A 1 s timeout beaten every 0.1 s: ample slack for a loaded CI machine.
  client = FakeClient()
  wd0, codes0 = _watchdog(client, 0, 1.0)
  wd1, codes1 = _watchdog(client, 1, 1.0)
  time.sleep(2.0)                    # two timeouts, both beating
  assert codes0 == codes1 == []
  client.fail = True                 # a blip shorter than the timeout
  time.sleep(0.3)
  client.fail = False
  time.sleep(0.5)
  assert codes0 == codes1 == []
  wd1.finish()                       # a normal exit: 'done', never 'dead'
  time.sleep(2.0)
  assert codes0 == [] and client.kv['gemjax/heartbeat/1'] == PeerWatchdog.DONE
  client.fail = True                 # the coordinator gone for good
  wd2, codes2 = _watchdog(client, 1, 1.0)
  assert _wait_for(codes2, 5) == [EXIT_PEER_LOST]
  for wd in (wd0, wd2):
    wd.stop()


def test_watchdog_fail_exit_codes_name_the_cause(caplog):
  codes = []
  wd = PeerWatchdog(FakeClient(), 1, 2, 60, exit_fn=codes.append)
  wd.fail(jax.errors.JaxRuntimeError('UNKNOWN: Gloo all-reduce failed: Read error '
                                     '[127.0.0.1]:4533: Connection reset by peer'))
  wd.fail(ConfigError('mesh.fsdp=3 is invalid'))
  wd.fail(ValueError('a bug'))
  assert codes == [EXIT_PEER_LOST, 2, 1]
  assert 'a cross-process collective failed' in caplog.text
  assert 'mesh.fsdp=3 is invalid' in caplog.text and 'a bug' in caplog.text


def test_distributed_keys_are_validated_with_the_key_in_the_message():
  for override, message in [
      ('mesh.heartbeat_timeout_s=0', r'mesh\.heartbeat_timeout_s=0 is invalid'),
      ('mesh.initialization_timeout_s=-1', r'mesh\.initialization_timeout_s=-1 is invalid'),
      ('mesh.process_id=2', r'mesh\.process_id=2 is invalid: in \[0, mesh\.num_processes=2\)'),
      ('mesh.coordinator_address=localhost', r"mesh\.coordinator_address='localhost'")]:
    with pytest.raises(ConfigError, match=message):
      load_config(None, ['mesh.distributed=true', 'mesh.coordinator_address=127.0.0.1:1234',
                         'mesh.num_processes=2', 'mesh.process_id=0', override])
