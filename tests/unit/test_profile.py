"""train.profile_steps=[start, end]: which steps the trace holds, that the
traced work is finished before the trace stops, and the config errors."""

import pytest

from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.train import profile as profile_lib


@pytest.fixture
def calls(monkeypatch):
  """The profiler calls a StepProfiler makes, in order."""
  out = []
  monkeypatch.setattr(profile_lib.jax.profiler, 'start_trace', lambda d: out.append('start'))
  monkeypatch.setattr(profile_lib.jax.profiler, 'stop_trace', lambda: out.append('stop'))
  monkeypatch.setattr(profile_lib.jax, 'block_until_ready',
                      lambda x: out.append(f'wait {x}') or x)
  return out


def _loop(profiler, calls, first, last):
  """The order of Trainer.run: before_step(done), the step, after_step(done + 1)."""
  for done in range(first, last):
    profiler.before_step(done)
    calls.append(f'step {done + 1}')
    profiler.after_step(done + 1, f'out{done + 1}')
  profiler.stop('final', last)


def test_trace_holds_the_steps_after_start_until_end_and_waits_for_them(tmp_path, calls):
  _loop(profile_lib.StepProfiler(str(tmp_path), [2, 4]), calls, 0, 6)
  assert calls == ['step 1', 'step 2', 'start', 'step 3', 'step 4', 'wait out4', 'stop',
                   'step 5', 'step 6']


def test_a_resumed_run_traces_from_its_first_step_and_an_early_end_stops_it(tmp_path, calls):
  _loop(profile_lib.StepProfiler(str(tmp_path), [2, 8]), calls, 3, 5)
  assert calls == ['start', 'step 4', 'step 5', 'wait final', 'stop']


def test_no_profile_steps_no_trace(tmp_path, calls):
  _loop(profile_lib.StepProfiler(str(tmp_path), []), calls, 0, 3)
  assert calls == ['step 1', 'step 2', 'step 3']


def test_profile_dir_is_under_the_run_dir_for_paths_and_urls():
  assert profile_lib.profile_dir('runs/x') == 'runs/x/profile'
  assert profile_lib.profile_dir('gs://b/runs/x/') == 'gs://b/runs/x/profile'


@pytest.mark.parametrize('value, message', [
    ('[3,3]', r'train.profile_steps=\[3, 3\] is invalid: \[\] \(off\) or \[start, end\]'),
    ('[-1,2]', r'train.profile_steps=\[-1, 2\] is invalid: .*0 <= start < end <= train.steps=10'),
    ('[2,11]', r'train.profile_steps=\[2, 11\] is invalid: .*end <= train.steps=10'),
    ('[1,2,3]', r'train.profile_steps=\[1, 2, 3\] is invalid: \[\] \(off\) or \[start, end\]'),
    ('[a,2]', r"train.profile_steps\[0\]='a' is not a valid int"),
    ('5', r'train.profile_steps=5 is not a valid list\[int\]'),
])
def test_bad_profile_steps_name_the_key_and_what_is_valid(value, message):
  with pytest.raises(ConfigError, match=message):
    load_config(None, ['train.steps=10', f'train.profile_steps={value}'])
