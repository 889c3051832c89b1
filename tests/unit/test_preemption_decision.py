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


def test_resume_with_another_process_count_is_refused_naming_both(tmp_path):
  from etils import epath
  from gemjax.errors import CheckpointError
  from gemjax.train.checkpoint import check_process_count
  data = tmp_path / '7' / 'data'
  data.mkdir(parents=True)
  for i in range(2):
    (data / f'process_{i}-of-2.json').write_text('{}')
  check_process_count(epath.Path(data), 1, 2)
  with pytest.raises(CheckpointError, match=r'saved by 2 process\(es\).*this run has 1'):
    check_process_count(epath.Path(data), 0, 1)
