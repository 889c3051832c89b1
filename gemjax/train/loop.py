"""The training loop: `python train.py configs/nano.yaml key=value ...`.

Start-up: config + validation -> (multi-host init) -> mesh -> model/optimizer
-> data iterator -> resume from the run directory, or `init_from` for
fine-tuning, or a fresh init. Then: steps with a progress bar, metrics every
`log_every` steps (loss, grad norm, LR, tokens/s, step time, MFU) to the
console, JSONL and TensorBoard (tokens/s counts real tokens, not padding),
checkpoints every `checkpoint.every` steps, and with `eval.every` the eval-split
loss and teacher-forced task accuracy (gemjax/train/evaluation.py).
`train.run_dir` may be a gs:// bucket (gemjax/train/storage.py);
`train.profile_steps` traces a few steps (gemjax/train/profile.py).

Failure handling: a non-finite loss/gradient skips the update (the step
function keeps the old state), is counted and logged; after
`train.max_nonfinite_steps` in a row the run saves and stops with exit code 3.
SIGTERM (TPU preemption) saves a checkpoint and exits 0; with several
processes, all of them at the one step JAX's preemption service agrees on.
A process that dies or hangs (no heartbeat for `mesh.heartbeat_timeout_s`)
makes the others log which one and exit with code 4 (PeerWatchdog).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import NoReturn, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemjax import config as config_lib
from gemjax.data import registry as data_registry
from gemjax.errors import CheckpointError, GemjaxError
from gemjax.model import attention as attention_lib
from gemjax.model import flops as flops_lib
from gemjax.parallel import layouts
from gemjax.parallel import mesh as mesh_lib
from gemjax.parallel import sharding as shd
from gemjax.train import checkpoint as ckpt_lib
from gemjax.train import evaluation as eval_lib
from gemjax.train import metrics as metrics_lib
from gemjax.train import profile as profile_lib
from gemjax.train import state as state_lib

log = logging.getLogger('gemjax')

EXIT_NONFINITE = 3
# A peer process died or hangs (multi-host runs; PeerWatchdog).
EXIT_PEER_LOST = 4


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S', force=True)
  logging.getLogger('absl').setLevel(logging.WARNING)


def maybe_initialize_distributed(mesh_cfg) -> 'PeerWatchdog | None':
  """`mesh.distributed`: joins the other processes, then watches them.

  JAX's own heartbeat check (which aborts) is a backstop behind the
  PeerWatchdog (which exits cleanly, see there): JAX may notice a silent
  process half its timeout early, so it gets 3 x `mesh.heartbeat_timeout_s`
  + 10 s, comfortably after the watchdog's verdict and exit.
  """
  if not mesh_cfg.distributed:
    return None
  kwargs = {}
  if mesh_cfg.coordinator_address:
    kwargs.update(coordinator_address=mesh_cfg.coordinator_address,
                  num_processes=mesh_cfg.num_processes, process_id=mesh_cfg.process_id)
    # JAX ends a process that waits longer with a C++ abort whose message
    # blames "another task"; this line says what it was waiting for.
    log.info('process %d: waiting up to %d s (mesh.initialization_timeout_s) for %d '
             'processes to join at %s', mesh_cfg.process_id,
             mesh_cfg.initialization_timeout_s, mesh_cfg.num_processes,
             mesh_cfg.coordinator_address)
  jax.distributed.initialize(  # on Cloud TPU address, count and id are discovered
      **kwargs, initialization_timeout=mesh_cfg.initialization_timeout_s,
      heartbeat_timeout_seconds=3 * mesh_cfg.heartbeat_timeout_s + 10)
  # The runtime client is not public API; Orbax reaches it the same way.
  from jax._src import distributed as jax_distributed
  state = jax_distributed.global_state
  if state.client is None or state.num_processes < 2:
    return None
  return PeerWatchdog(state.client, state.process_id, state.num_processes,
                      mesh_cfg.heartbeat_timeout_s).start()


class PeerWatchdog:
  """A dead peer becomes a logged error and exit code 4 in bounded time.

  Without it a killed process leaves the others blocked in a collective (gloo
  on CPU waits forever) until JAX's heartbeat check ends them with a C++ abort
  (SIGABRT and a stack trace, ~70 s with JAX's defaults); jaxlib 0.10 offers no
  Python hook to replace that abort (its `missed_heartbeat_callback` cannot
  pass the status to Python and terminates with std::bad_cast).

  Every process bumps a counter in the coordinator's key-value store every
  `interval` seconds from a daemon thread (runs while the main thread is
  blocked in XLA). Process 0 declares a process dead when its counter has not
  moved for `timeout_s`, publishes the verdict, and every process logs it and
  leaves with os._exit (the main thread cannot be interrupted, and a normal
  exit would wait in JAX's shutdown barrier for the dead process).

  Limit: if process 0 itself dies, the coordinator goes with it and JAX aborts
  the others within about a second ("Terminating process because the JAX
  distributed service detected fatal errors"), before this thread can act.
  """

  BEATS = 'gemjax/heartbeat/'
  DONE = 'done'
  VERDICT = 'gemjax/peer_lost/'

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float,
               *, exit_fn=os._exit):
    self.client, self.process_id, self.timeout_s = client, process_id, timeout_s
    self.peers = [p for p in range(num_processes) if p != process_id]
    self.interval = min(5.0, max(0.1, timeout_s / 10))
    self._exit = exit_fn
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='gemjax-peer-watchdog',
                                    daemon=True)

  def start(self) -> 'PeerWatchdog':
    self._thread.start()
    # Registered after JAX's own atexit shutdown, so it runs first, while the
    # client still works.
    atexit.register(self.finish)
    return self

  def stop(self) -> None:
    self._stop.set()

  def finish(self) -> None:
    """A normal exit: stop beating and say so, so that a process that is done
    first (and waits in JAX's shutdown barrier) is not declared dead."""
    self.stop()
    self._thread.join(timeout=self.interval + 10)
    try:
      self.client.key_value_set(f'{self.BEATS}{self.process_id}', self.DONE,
                                allow_overwrite=True)
    except Exception:
      pass

  def _run(self) -> None:
    beats, failing_since = 0, None
    now = time.monotonic()
    last = {p: (None, now) for p in self.peers}   # peer -> (counter, when it last moved)
    while not self._stop.wait(self.interval):
      try:
        beats += 1
        self.client.key_value_set(f'{self.BEATS}{self.process_id}', str(beats),
                                  allow_overwrite=True)
        if self.process_id == 0:
          verdict = self._check_peers(last)
        else:
          published = [v for _, v in self.client.key_value_dir_get(self.VERDICT)]
          verdict = f'process 0 reports: {published[0]}' if published else None
        failing_since = None
      except Exception as e:  # the coordinator is unreachable (or a transient error)
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since < self.timeout_s:
          continue
        verdict = (f'the coordinator (process 0) has been unreachable for '
                   f'{self.timeout_s} s (mesh.heartbeat_timeout_s): {type(e).__name__}: {e}')
      if verdict and not self._stop.is_set():
        self._lose(verdict)
        return

  def _check_peers(self, last: dict) -> str | None:
    beats = dict(self.client.key_value_dir_get(self.BEATS))
    now = time.monotonic()
    for p, (seen, since) in last.items():
      value = beats.get(f'{self.BEATS}{p}')
      if value != seen:
        last[p] = (value, now)
    dead = [p for p, (seen, since) in last.items()
            if seen != self.DONE and now - since > self.timeout_s]
    if not dead:
      return None
    verdict = (f'process {", ".join(map(str, dead))} sent no heartbeat for '
               f'{self.timeout_s} s (mesh.heartbeat_timeout_s): it was killed, crashed '
               'or hangs; see its log. The run cannot continue without it: restart '
               'all processes (training resumes from the last checkpoint)')
    try:  # the others read it and leave too
      self.client.key_value_set(f'{self.VERDICT}0', verdict, allow_overwrite=True)
    except Exception:
      pass
    return verdict

  def fail(self, error: Exception) -> NoReturn:
    """This process cannot go on: log why and leave at once. A normal exit
    would wait in JAX's shutdown barrier for peers that are themselves blocked
    in a collective waiting for this process, until JAX aborts both; instead
    the peers see this process's heartbeats stop and leave too."""
    self.stop()
    text = f'{type(error).__name__}: {error}'
    if isinstance(error, GemjaxError):
      code = 2
      log.error('process %d: %s', self.process_id, error)
    elif isinstance(error, jax.errors.JaxRuntimeError) and any(
        word in text.lower() for word in ('gloo', 'connection', 'peer')):
      code = EXIT_PEER_LOST
      log.error('process %d: a cross-process collective failed, so another process has '
                'probably died (see its log): %s. Exiting with code %d.',
                self.process_id, text, code)
    else:
      code = 1
      log.error('process %d failed; exiting with code %d', self.process_id, code,
                exc_info=error)
    self._leave(code)

  def _lose(self, verdict: str) -> None:
    log.error('process %d: %s. Exiting with code %d.', self.process_id, verdict,
              EXIT_PEER_LOST)
    if self.process_id == 0:   # let the others read the verdict before the store goes
      time.sleep(2 * self.interval + 0.5)
    self._leave(EXIT_PEER_LOST)

  def _leave(self, code: int) -> None:
    for handler in logging.getLogger().handlers:
      handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    self._exit(code)   # os._exit: skips JAX's shutdown barrier with the lost peer


def build_mesh(cfg) -> jax.sharding.Mesh:
  """The run's mesh on all devices: per-slice sizes from `mesh.*`, slices
  from `mesh.dcn_*` (topology-aware, see `sharding.make_mesh`)."""
  sizes = mesh_lib.validate_mesh(cfg, jax.device_count())
  return shd.make_mesh(sizes, dcn=mesh_lib.dcn_shape(cfg.mesh))


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (one process).

  With several processes no handler is installed: jax.distributed.initialize
  started JAX's preemption service, whose own SIGTERM handler feeds Orbax's
  `reached_preemption`; a Python handler would replace it, and the hosts would
  never agree on a step to save.
  """

  def __init__(self, process_count: int = 1):
    self.requested = False
    self._installed = process_count == 1
    if self._installed:
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    # None: the old handler was not installed from Python (JAX's, in a
    # one-process distributed run) and cannot be put back from Python.
    if self._installed and self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def should_save_for_preemption(local_sigterm: bool, synced: bool,
                               process_count: int) -> bool:
  """Whether to save and stop before the next step.

  `synced` is Orbax's `reached_preemption(step)`: JAX's preemption service
  picks one step for every process. With several processes it is the only
  trigger: SIGTERM reaches each host at a different step, and hosts that save
  different steps leave no complete checkpoint (or hang in Orbax's barriers).
  One process has no one to agree with, so its own SIGTERM is enough.
  """
  if process_count > 1:
    return synced
  return local_sigterm or synced


@dataclasses.dataclass
class Trainer:
  """Everything a run holds; built by `Trainer.create`, driven by `run`."""
  cfg: config_lib.Config
  mesh: jax.sharding.Mesh
  mdef: state_lib.ModelDef
  tx: object
  state: dict
  step_fn: object
  batch_shards: dict | None
  data_iter: object
  checkpointer: ckpt_lib.Checkpointer
  start_step: int

  @classmethod
  def create(cls, cfg: config_lib.Config) -> 'Trainer':
    mesh = build_mesh(cfg)
    mdef = state_lib.model_def(cfg.model)
    loaded = (ckpt_lib.loaded_extent(cfg.checkpoint.init_from, mdef.abstract_params)
              if cfg.checkpoint.freeze_loaded_steps else None)
    tx = state_lib.optimizer_for(cfg, mdef, loaded)
    schedule = state_lib.lr_schedule(cfg.optimizer, cfg.train.steps)
    data_iter = data_registry.make_iterator(cfg, 'train', jax.process_index(),
                                            jax.process_count())
    c = cfg.checkpoint
    checkpointer = ckpt_lib.Checkpointer(cfg.train.run_dir, every=c.every, keep=c.keep,
                                         async_save=c.async_save)
    state, start = None, 0
    latest = checkpointer.latest_step() if c.resume else None
    if latest is not None:
      log.info('resuming from %s/%d', checkpointer.directory, latest)
      abstract = state_lib.abstract_state(mdef, tx, mesh)
      state = checkpointer.restore(latest, abstract, data_iter)
      start = int(state['step'])
    else:
      state = state_lib.init_state(cfg.model, mdef, tx, mesh, cfg.train.seed)
      if c.init_from and c.init_partial:
        state['params'] = ckpt_lib.load_params_partial(c.init_from, state['params'])
        log.info('initialised parameters from %s; new parameters and vocabulary rows '
                 'freshly initialised (fresh optimizer)', c.init_from)
      elif c.init_from:
        params = ckpt_lib.load_params(c.init_from,
                                      state_lib.abstract_state(mdef, tx, mesh)['params'])
        state['params'] = params
        log.info('initialised parameters from %s (fresh optimizer)', c.init_from)
    step_fn = state_lib.make_train_step(mdef, tx, cfg.model, schedule)
    return cls(cfg, mesh, mdef, tx, state, step_fn, None, data_iter, checkpointer, start)

  def _lay_out(self, batch: dict) -> dict:
    """Balances causal work over the 'context' axis (ring attention): every
    per-token array is permuted by mesh.context_layout before it is split."""
    n = self.mesh.shape['context']
    return batch if n == 1 else layouts.apply_layout(batch, self.cfg.mesh.context_layout, n)

  def _jitted(self, batch: dict):
    if self.batch_shards is None:
      self.batch_shards = state_lib.batch_shardings(self.mesh, {k: v.ndim for k, v in batch.items()})
      shards = state_lib.state_shardings(self.mdef, self.tx, self.mesh)
      self.step_fn = state_lib.jit_train_step(self.step_fn, shards, self.batch_shards)
    return self.step_fn

  def save(self, step: int, *, force: bool = False) -> bool:
    return self.checkpointer.save(step, self.state, self.data_iter,
                                  config_lib.to_dict(self.cfg), force=force)

  def run(self) -> int:
    """Trains to `train.steps`; returns the process exit code."""
    cfg, t = self.cfg, self.cfg.train
    primary = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(t.run_dir, tensorboard=t.tensorboard, enabled=primary)
    peak, peak_src = metrics_lib.peak_flops(t.peak_flops)
    flops_step = flops_lib.train_flops_per_step(self.mdef.spec, t.batch_size, t.seq_len)
    flops_causal = flops_lib.train_flops_per_step(self.mdef.spec, t.batch_size, t.seq_len,
                                                  causal_half=True)
    log.info('model: %s parameters; %.3g FLOPs/step (%.3g counting the causal half); '
             'peak %.3g FLOP/s (%s); mesh %s', f'{state_lib.param_count(self.mdef):,}',
             flops_step, flops_causal, peak, peak_src, dict(self.mesh.shape))
    m = cfg.model
    note = attention_lib.platform_fallback(m.attention, seq_len=t.seq_len, head_dim=m.head_dim,
                                           compute_dtype=m.compute_dtype)
    if note:
      log.warning('%s', note)
    processes = jax.process_count()
    preempt = Preemption(processes)
    profiler = profile_lib.StepProfiler(t.run_dir, t.profile_steps)
    bar = None
    if t.progress_bar and primary:
      from tqdm import tqdm
      bar = tqdm(total=t.steps, initial=self.start_step, desc='train', dynamic_ncols=True)
    nonfinite_run, nonfinite_total = 0, 0
    pending = None   # (step, metrics) of the last dispatched step
    window_t0, window_steps, window_sum = time.perf_counter(), 0, None
    evaluator = eval_lib.TrainingEval(cfg, self.mdef, self.mesh) if cfg.eval.every else None
    exit_code = 0
    step = self.start_step
    try:
      with shd.use_mesh(self.mesh):
        while step < t.steps:
          # Asked every step on every process, as JAX's preemption sync needs.
          synced = self.checkpointer.reached_preemption(step)
          if should_save_for_preemption(preempt.requested, synced, processes):
            log.warning('preemption signal: saving step %d and exiting', step)
            self.save(step, force=True)
            self.checkpointer.wait()
            break
          profiler.before_step(step)
          batch = self._lay_out(next(self.data_iter))
          step_fn = self._jitted(batch)
          self.state, metrics = step_fn(self.state, state_lib.to_global(batch, self.batch_shards))
          step += 1
          profiler.after_step(step, (self.state, metrics))
          window_steps += 1
          # Read the previous step's flags while this one runs (no pipeline stall).
          if pending is not None:
            nonfinite_run, nonfinite_total, stop = self._check_finite(
                pending, nonfinite_run, nonfinite_total)
            if stop:
              exit_code = EXIT_NONFINITE
              break
          pending = (step, metrics)
          window_sum = _accumulate(window_sum, metrics)
          self.save(step)
          if bar is not None:
            bar.update(1)
          if step % t.log_every == 0 or step == t.steps:
            jax.block_until_ready(metrics)
            elapsed = time.perf_counter() - window_t0
            window = _window_mean(jax.device_get(window_sum), jax.device_get(metrics),
                                  window_steps)
            summary = metrics_lib.summarize(window)
            summary.update(throughput(window, window_steps, elapsed, t.batch_size, t.seq_len))
            step_time = summary['step_time_s']
            # mfu: attention over the full T x T square; mfu_causal: its causal half.
            summary.update(mfu=flops_step / step_time / peak,
                           mfu_causal=flops_causal / step_time / peak,
                           nonfinite_steps=nonfinite_total)
            writer.write(step, summary)
            msg = (f"step {step}: loss {summary['loss']:.4f} gnorm {summary['grad_norm']:.3f} "
                   f"lr {summary['learning_rate']:.2e} {summary['tokens_per_s']:.0f} tok/s "
                   f"{step_time * 1e3:.0f} ms/step MFU {summary['mfu']:.1%}")
            if bar is not None:
              bar.write(msg)
            else:
              log.info(msg)
            window_t0, window_steps, window_sum = time.perf_counter(), 0, None
          if evaluator is not None and (step % cfg.eval.every == 0 or step == t.steps):
            window_t0 += self._evaluate(evaluator, step, writer, bar)   # not training time
        if pending is not None and exit_code == 0:
          nonfinite_run, nonfinite_total, stop = self._check_finite(
              pending, nonfinite_run, nonfinite_total)
          exit_code = EXIT_NONFINITE if stop else 0
        if exit_code == EXIT_NONFINITE or step >= t.steps:
          self.save(step, force=True)
    finally:
      self.checkpointer.wait()
      preempt.restore()
      if bar is not None:
        bar.close()
      writer.close()
      profiler.stop(self.state, step)   # a run that ended inside the window
    if exit_code == EXIT_NONFINITE:
      log.error('stopped after %d non-finite steps in a row (checkpoint saved at step %d)',
                nonfinite_run, step)
    return exit_code

  def _evaluate(self, evaluator, step: int, writer, bar) -> float:
    """`eval.every`: evaluates the current parameters (read only: the
    training trajectory does not change), logs split 'eval'; returns seconds."""
    t0 = time.perf_counter()
    scalars = evaluator(self.state['params'])
    writer.write(step, scalars, prefix='eval')
    msg = eval_lib.format_eval_line(step, scalars)
    if bar is not None:
      bar.write(msg)
    else:
      log.info(msg)
    return time.perf_counter() - t0

  def _check_finite(self, pending, run: int, total: int):
    step, metrics = pending
    if bool(np.asarray(metrics['finite'])):
      return 0, total, False
    run, total = run + 1, total + 1
    log.warning('step %d: non-finite loss/gradient (loss=%s); update skipped '
                '(%d in a row, %d total)', step, np.asarray(metrics['loss']), run, total)
    return run, total, run >= self.cfg.train.max_nonfinite_steps


def throughput(window: dict, steps: int, elapsed: float, batch_size: int,
               seq_len: int) -> dict[str, float]:
  """Speed over a logging window: `tokens_per_s` counts real tokens (segment
  id > 0, the step's `tokens_sum`), so packing efficiency shows in it;
  `padded_tokens_per_s` counts every slot of the [B, T] batch (what the
  hardware processed, and what MFU's FLOPs count)."""
  step_time = elapsed / steps
  return {'step_time_s': step_time,
          'tokens_per_s': float(np.asarray(window['tokens_sum'])) / elapsed,
          'padded_tokens_per_s': batch_size * seq_len / step_time}


def _accumulate(total, metrics):
  """Running sum of a step's float metrics, on device (no host sync)."""
  if total is None:
    return metrics
  return jax.tree.map(lambda a, b: a + b if jnp.issubdtype(a.dtype, jnp.floating) else b,
                      total, metrics)


def _window_mean(total, last, steps: int) -> dict:
  """Metrics logged for a window of steps: means of the per-step values;
  token-weighted sums (`*_sum/*`) stay sums (their ratios are the means);
  the learning rate and non-float values are the last step's."""
  out = {}
  for k, v in total.items():
    if '_sum' in k:
      out[k] = v
    elif k.endswith('learning_rate') or not np.issubdtype(np.asarray(v).dtype, np.floating):
      out[k] = last[k]
    else:
      out[k] = np.asarray(v) / steps
  return out


def main(argv: Sequence[str] | None = None) -> int:
  setup_logging()
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ('-h', '--help'):
    print(__doc__)
    print('usage: python train.py [CONFIG.yaml] [section.key=value ...] [--print-config]')
    return 0
  # --print-config: the resolved config as YAML, then exit (nothing is built).
  print_config = '--print-config' in argv
  argv = [a for a in argv if a != '--print-config']
  path = argv.pop(0) if argv and '=' not in argv[0] else None
  try:
    cfg = config_lib.load_config(path, argv)
    if print_config:
      print(config_lib.to_yaml(cfg), end='')
      return 0
    watchdog = maybe_initialize_distributed(cfg.mesh)
    try:
      trainer = Trainer.create(cfg)
      code = trainer.run()
      trainer.checkpointer.close()
      return code
    except Exception as e:
      if watchdog is not None:
        watchdog.fail(e)   # several processes: log and leave now (never returns)
      raise
  except GemjaxError as e:
    log.error('%s', e)
    return 2


if __name__ == '__main__':
  sys.exit(main())
