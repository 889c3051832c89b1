"""Every preset builds; TPU presets pass the abstract check on their intended mesh."""

import glob
import os

import pytest

from gemjax.config import load_config
from gemjax.parallel.sharding import MESH_AXES
from gemjax.train.aot import abstract_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_PRESETS = ['flash', 'pro', 'ultra']


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.yaml'))),
                         ids=os.path.basename)
def test_every_preset_loads_and_validates(path):
  # The fine-tuning recipe is a template over an imported model (convert
  # import --finetune fills in the model and checkpoint.init_from).
  overrides = (['checkpoint.init_from=runs/imported'] if path.endswith('finetune-multimodal.yaml')
               else [])
  load_config(path, overrides)


@pytest.mark.parametrize('name', TPU_PRESETS)
def test_tpu_preset_abstract_init_and_train_step(name):
  path = os.path.join(ROOT, 'configs', f'{name}.yaml')
  if not os.path.exists(path):
    pytest.skip(f'{name} preset not written yet')
  cfg = load_config(path)
  sizes = {a: getattr(cfg.mesh, a) for a in MESH_AXES}
  report = abstract_check(cfg, sizes)
  assert report['loss_shape'] == ()
  assert report['devices'] >= 64
  # The sharded train state must fit a v5p chip (95 GiB HBM) with room for activations.
  assert report['state_bytes_per_device'] < 40 * 2**30
