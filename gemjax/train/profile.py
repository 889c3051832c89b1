"""A profiler trace of a few training steps: `train.profile_steps=[start, end]`.

The trace starts when `start` steps are done (so compilation, in the first
step, stays out of it when start >= 1) and stops when `end` steps are, after
the last traced step has finished on the devices (`block_until_ready`: jit
dispatch is asynchronous, and a trace stopped early would miss the work).
The trace therefore holds the steps logged as start+1 .. end, data loading
between them included. A run resumed inside the window traces from its
first step; a run that stops early (preemption, non-finite losses) ends the
trace where it stops.

jax.profiler writes `<run_dir>/profile/plugins/profile/<time>/<host>.xplane.pb`
(one file per process: each traces its own devices), the layout TensorBoard's
profile plugin and XProf read (README, "Profiling"). A gs:// run directory
gets the trace copied once it stops (`gemjax.train.storage`).

Imports jax and `gemjax.train.storage` only.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Any, Sequence

import jax

from gemjax.train import storage

log = logging.getLogger('gemjax')


def profile_dir(run_dir: str) -> str:
  """<run_dir>/profile, for a local path or a URL."""
  if storage.is_remote(run_dir):
    return posixpath.join(run_dir.rstrip('/'), 'profile')
  return os.path.join(run_dir, 'profile')


class StepProfiler:
  """Starts and stops one jax.profiler trace around steps [start, end)."""

  def __init__(self, run_dir: str, steps: Sequence[int]):
    self.window = tuple(steps) if steps else None
    self.directory = profile_dir(run_dir)
    self.active = False
    self.done = False
    self._staged: storage.StagedDir | None = None
    self._first = 0

  def before_step(self, steps_done: int) -> None:
    """Called before each step with the number of steps already done."""
    if self.window is None or self.active or self.done:
      return
    start, end = self.window
    if start <= steps_done < end:
      self._staged = storage.StagedDir(self.directory)
      jax.profiler.start_trace(self._staged.local)
      self.active = True
      self._first = steps_done

  def after_step(self, steps_done: int, outputs: Any) -> None:
    """Called after each step is dispatched; `outputs` are what it returns."""
    if self.active and steps_done >= self.window[1]:
      self.stop(outputs, steps_done)

  def stop(self, outputs: Any = None, steps_done: int | None = None) -> None:
    """Ends the trace (if one runs) once `outputs` are computed."""
    if not self.active:
      return
    self.active, self.done = False, True
    try:
      jax.block_until_ready(outputs)
    except Exception as e:  # pylint: disable=broad-except
      # A run failing inside the window: keep its own error, save the trace.
      log.warning('profile: the traced steps did not finish: %s', e)
    jax.profiler.stop_trace()
    self._staged.close()
    upto = f'{steps_done}' if steps_done is not None else 'the end of the run'
    log.info('profile of steps %d..%s written to %s', self._first + 1, upto, self.directory)
