"""When a preemption saves: with several processes only at the step JAX's
preemption service synchronised, never on one host's own SIGTERM."""

import signal

import pytest

from gemjax.train import loop


@pytest.mark.parametrize('process_count', [2, 8])
def test_multi_process_saves_only_at_the_synchronised_preemption_step(process_count):
  # A host that saw SIGTERM itself must keep training until the synced step,
  # or the hosts save different steps.
  assert not loop.should_save_for_preemption(True, False, process_count)
  assert loop.should_save_for_preemption(False, True, process_count)
  assert loop.should_save_for_preemption(True, True, process_count)
  assert not loop.should_save_for_preemption(False, False, process_count)


def test_single_process_saves_on_its_own_sigterm_or_the_synced_step():
  assert loop.should_save_for_preemption(True, False, 1)
  assert loop.should_save_for_preemption(False, True, 1)
  assert not loop.should_save_for_preemption(False, False, 1)


def test_multi_process_leaves_sigterm_to_jax_preemption_service():
  before = signal.getsignal(signal.SIGTERM)
  multi = loop.Preemption(process_count=2)
  # A Python handler would replace the one that feeds reached_preemption.
  assert signal.getsignal(signal.SIGTERM) is before
  multi.restore()
  single = loop.Preemption(process_count=1)
  try:
    assert signal.getsignal(signal.SIGTERM) == single._handle
    single._handle(signal.SIGTERM, None)
    assert single.requested
  finally:
    single.restore()
  assert signal.getsignal(signal.SIGTERM) is before
