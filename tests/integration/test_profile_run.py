"""train.profile_steps on a real (tiny) run: jax.profiler writes an XPlane
trace under <run_dir>/profile, where TensorBoard's profile plugin looks."""

import glob
import os

import jax
import pytest

from gemjax.config import load_config
from gemjax.train.loop import Trainer

TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=256', 'train.batch_size=8', 'train.seq_len=32',
        'train.log_every=1', 'train.progress_bar=false', 'train.tensorboard=false',
        'checkpoint.async_save=false', 'train.peak_flops=1e9']


@pytest.mark.slow   # 19-27 s on 2 busy cores: compile + the profiler's start/stop
def test_profile_steps_write_an_xplane_trace_under_the_run_dir(tmp_path):
  run = tmp_path / 'run'
  cfg = load_config(None, TINY + [f'train.run_dir={run}', 'train.steps=2',
                                  'train.profile_steps=[1,2]'])
  trainer = Trainer.create(cfg)
  assert trainer.run() == 0
  trainer.checkpointer.close()
  traces = glob.glob(str(run / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  # The traced step ran inside the window: the jitted train step is in it.
  trace = jax.profiler.ProfileData.from_file(traces[0])
  names = {e.name for plane in trace.planes for line in plane.lines for e in line.events}
  assert any('step_fn' in n for n in names), sorted(names)[:20]
