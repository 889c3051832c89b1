"""Config loading and validation: errors name the key, the value, what is valid."""

import pytest

from gemjax.config import load_config, validate
from gemjax.errors import ConfigError


def test_presets_load_and_overrides_apply():
  cfg = load_config('configs/nano.yaml', ['model.num_layers=4', 'mesh.fsdp=2',
                                          'optimizer.learning_rate=1e-3'])
  assert cfg.model.num_layers == 4 and cfg.mesh.fsdp == 2
  assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
  assert cfg.train.run_dir == 'runs/nano'   # from the preset


@pytest.mark.parametrize('override, message', [
    ('model.num_layer=3', r"unknown config key 'model.num_layer'; did you mean 'model.num_layers'"),
    ('trian.steps=3', r"unknown config key 'trian.steps'; did you mean 'train.steps'"),
    ('model.num_layers=abc', r"model.num_layers='abc' is not a valid int"),
    ('model.num_kv_heads=3', r'model.num_kv_heads=3 is invalid: must divide model.num_heads=4'),
    ('model.remat=sometimes', r"model.remat='sometimes' is invalid: one of \('none'"),
    ('model.attention=dence', r"model.attention='dence' is invalid: .*did you mean 'dense'"),
    ('data.source=synthetc', r"data.source='synthetc' is invalid: .*did you mean 'synthetic'"),
    ('mesh.context_layout=zigzg', r"mesh.context_layout='zigzg' is invalid: one of \('contiguous', 'zigzag', 'striped'\)"),
    ('model', r"must look like 'section.key=value'"),
    ('model=3', r"'model' is a section"),
])
def test_bad_overrides_name_key_and_valid_values(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config('configs/nano.yaml', [override])


def test_mesh_errors_name_axes_and_device_count():
  cfg = load_config(None, ['mesh.data=2', 'mesh.fsdp=2'])
  with pytest.raises(ConfigError, match=r'product of the axes .*is 4, but there are 8 devices'):
    validate(cfg, num_devices=8)
  cfg = load_config(None, ['mesh.tensor=8', 'model.num_heads=4', 'model.num_kv_heads=4'])
  with pytest.raises(ConfigError, match=r'model.num_heads=4 is invalid: must be divisible by mesh.tensor=8'):
    validate(cfg, num_devices=8)
  cfg = load_config(None, ['mesh.data=-1', 'mesh.fsdp=3'])
  with pytest.raises(ConfigError, match=r'do not divide the 8 devices'):
    validate(cfg, num_devices=8)
  cfg = load_config(None, ['train.batch_size=4', 'mesh.data=8'])
  with pytest.raises(ConfigError, match=r'train.batch_size=4 is invalid: must be divisible by the batch shards'):
    validate(cfg, num_devices=8)


def test_zigzag_layout_needs_two_chunks_per_context_shard():
  cfg = load_config(None, ['mesh.data=2', 'mesh.context=4', 'train.seq_len=20'])
  with pytest.raises(ConfigError, match=r"train.seq_len=20 is invalid: must be divisible by "
                                        r"2 \* mesh.context=8 for mesh.context_layout='zigzag'"):
    validate(cfg, num_devices=8)
  validate(load_config(None, ['mesh.data=2', 'mesh.context=4', 'train.seq_len=20',
                              'mesh.context_layout=striped']), num_devices=8)


def test_yaml_errors_name_the_file(tmp_path):
  bad = tmp_path / 'bad.yaml'
  bad.write_text('model:\n  d_modle: 64\n')
  with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.d_modle'; did you mean 'model.d_model'"):
    load_config(str(bad))
  with pytest.raises(ConfigError, match='does not exist'):
    load_config(str(tmp_path / 'nope.yaml'))
