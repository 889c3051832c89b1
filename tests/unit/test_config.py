"""Config loading and validation: errors name the key, the value, what is valid."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.parallel.mesh import validate_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    ('eval.every=-5', r"eval.every=-5 is invalid: a number of steps >= 0 \(0 = no evaluation"),
    ('eval.train_max_records=-1', r"eval.train_max_records=-1 is invalid: >= 0"),
    ('model', r"must look like 'section.key=value'"),
    ('model=3', r"'model' is a section"),
])
def test_bad_overrides_name_key_and_valid_values(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config('configs/nano.yaml', [override])


def test_mesh_errors_name_axes_and_device_count():
  cfg = load_config(None, ['mesh.data=2', 'mesh.fsdp=2'])
  with pytest.raises(ConfigError, match=r'product of the axes .*is 4, but there are 8 devices'):
    validate_mesh(cfg, num_devices=8)
  cfg = load_config(None, ['mesh.tensor=8', 'model.num_heads=4', 'model.num_kv_heads=4'])
  with pytest.raises(ConfigError, match=r'model.num_heads=4 is invalid: must be divisible by mesh.tensor=8'):
    validate_mesh(cfg, num_devices=8)
  cfg = load_config(None, ['mesh.data=-1', 'mesh.fsdp=3'])
  with pytest.raises(ConfigError, match=r'do not divide the 8 devices'):
    validate_mesh(cfg, num_devices=8)
  cfg = load_config(None, ['train.batch_size=4', 'mesh.data=8'])
  with pytest.raises(ConfigError, match=r'train.batch_size=4 is invalid: must be divisible by the batch shards'):
    validate_mesh(cfg, num_devices=8)


def test_zigzag_layout_needs_two_chunks_per_context_shard():
  cfg = load_config(None, ['mesh.data=2', 'mesh.context=4', 'train.seq_len=20'])
  with pytest.raises(ConfigError, match=r"train.seq_len=20 is invalid: must be divisible by "
                                        r"2 \* mesh.context=8 for mesh.context_layout='zigzag'"):
    validate_mesh(cfg, num_devices=8)
  validate_mesh(load_config(None, ['mesh.data=2', 'mesh.context=4', 'train.seq_len=20',
                                   'mesh.context_layout=striped', 'model.attention=ring']),
                num_devices=8)


@pytest.mark.parametrize('layout', ['contiguous', 'zigzag', 'striped'])
def test_infini_rejects_a_context_split_in_any_layout(layout):
  # Infini's memory scan walks segments in array order: under zigzag/striped
  # earlier tokens would read later ones, and no layout splits the scan.
  cfg = load_config(None, ['mesh.data=4', 'mesh.context=2', 'model.attention=infini',
                           'model.infini.segment_len=32', f'mesh.context_layout={layout}'])
  with pytest.raises(ConfigError, match=r"model.attention='infini' is invalid: mesh.context=2 "
                                        r'splits the sequence.*set mesh.context=1'):
    validate_mesh(cfg, num_devices=8)
  validate_mesh(load_config(None, ['mesh.data=8', 'model.attention=infini',
                                   'model.infini.segment_len=32']), num_devices=8)


@pytest.mark.parametrize('kind', ['blockwise', 'cudnn', 'splash'])
def test_context_split_needs_a_kernel_that_splits_the_sequence(kind):
  # 'blockwise' (and the platform kernels that fall back to it) would
  # all-gather q/k/v: every context shard would compute the whole attention.
  cfg = load_config(None, ['mesh.data=4', 'mesh.context=2', f'model.attention={kind}'])
  with pytest.raises(ConfigError, match=rf"model.attention='{kind}' is invalid: mesh.context=2 "
                                        r'splits the sequence.*set model.attention=ring'):
    validate_mesh(cfg, num_devices=8)
  for ok in ('ring', 'dense'):
    validate_mesh(load_config(None, ['mesh.data=4', 'mesh.context=2',
                                     f'model.attention={ok}']), num_devices=8)
  validate_mesh(load_config(None, [f'model.attention={kind}']), num_devices=8)


@pytest.mark.parametrize('overrides, message', [
    # kv_heads -> tensor: 2 KV heads cannot be split 4 ways (was accepted, then
    # init raised jax's IndivisibleError).
    (['mesh.tensor=4', 'mesh.data=2', 'model.num_kv_heads=2'],
     r"model.num_kv_heads=2 is invalid: must be divisible by mesh.tensor=4 \('kv_heads'"),
    (['mesh.tensor=2', 'mesh.data=4', 'model.vocab_size=511'],
     r"model.vocab_size=511 is invalid: must be divisible by mesh.tensor=2 \('vocab'"),
    (['mesh.tensor=2', 'mesh.data=4', 'model.mlp_dim=63'],
     r"model.mlp_dim=63 is invalid: must be divisible by mesh.tensor=2 \('mlp'"),
    (['mesh.fsdp=8', 'mesh.data=1', 'model.d_model=36'],
     r"model.d_model=36 is invalid: must be divisible by mesh.fsdp=8 \('embed'"),
    (['mesh.tensor=2', 'mesh.data=4', 'model.moe.num_experts=4', 'model.moe.expert_dim=33'],
     r"model.moe.expert_dim=33 is invalid: must be divisible by mesh.tensor=2 \('mlp'"),
    (['mesh.expert=4', 'mesh.data=2', 'model.moe.num_experts=6', 'model.moe.top_k=2'],
     r"model.moe.num_experts=6 is invalid: must be divisible by mesh.expert=4 \('experts'"),
])
def test_widths_divisible_by_the_mesh_axes_they_are_split_over(overrides, message):
  cfg = load_config(None, overrides)
  with pytest.raises(ConfigError, match=message):
    validate_mesh(cfg, num_devices=8)


def test_yaml_errors_name_the_file(tmp_path):
  bad = tmp_path / 'bad.yaml'
  bad.write_text('model:\n  d_modle: 64\n')
  with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.d_modle'; did you mean 'model.d_model'"):
    load_config(str(bad))
  with pytest.raises(ConfigError, match='does not exist'):
    load_config(str(tmp_path / 'nope.yaml'))


def test_override_sets_a_field_of_a_list_entry_the_preset_wrote():
  base = load_config('configs/nano.yaml')
  cfg = load_config('configs/nano.yaml', ['data.datasets.0.weight=3',
                                          'data.datasets.6.path=data/other-*'])
  assert cfg.data.datasets[0].weight == 3.0
  assert cfg.data.datasets[6].path == 'data/other-*'
  # Every other entry and field is the preset's.
  assert cfg.data.datasets[0].path == base.data.datasets[0].path
  assert cfg.data.datasets[1:6] == base.data.datasets[1:6]


@pytest.mark.parametrize('override, message', [
    ('data.datasets.9.weight=3', r"'data.datasets.9.weight': index 9 is out of range; "
                                 r'data.datasets has 9 entries; valid indices are 0..8'),
    ('data.datasets.0.wieght=3', r"unknown config key 'data.datasets.0.wieght'; did you mean "
                                 r"'data.datasets.0.weight'\? \(entries of data.datasets have "
                                 r'the fields path, weight, kind'),
    ('data.datasets.first.weight=3', r'entries of data.datasets are addressed by index'),
    ('data.datasets.0.weight=heavy', r"data.datasets.0.weight='heavy' is not a valid float"),
    ('eval.passkey_lengths.0=256', r"index 0 is out of range; eval.passkey_lengths has 0 "
                                   r'entries; set the whole list instead'),
])
def test_bad_list_entry_overrides_name_the_key_and_what_is_valid(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config('configs/nano.yaml', [override])


@pytest.mark.parametrize('sections', ['[1,1]', '[1,1,1,1]', '[1,-1,1]', '[0,0,0]'])
def test_mrope_sections_of_wrong_length_or_sign_get_the_config_message(sections):
  with pytest.raises(ConfigError, match=r'model.mrope_sections=\(.*\) is invalid: three '
                                        r'non-negative weights for the \(t, h, w\) rotary sections'):
    load_config(None, [f'model.mrope_sections={sections}'])


@pytest.mark.parametrize('entry', [['train.py'], ['-m', 'gemjax.train']])
def test_print_config_prints_the_resolved_yaml_and_builds_nothing(entry, tmp_path):
  run_dir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, *entry, 'configs/nano.yaml', 'model.num_layers=8',
       'data.datasets.0.weight=3', f'train.run_dir={run_dir}', '--print-config'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  printed = OmegaConf.create(out.stdout)
  assert printed.model.num_layers == 8 and printed.data.datasets[0].weight == 3.0
  assert printed.train.steps == 2600     # from the preset
  assert not run_dir.exists()            # no trainer, no checkpoint directory


@pytest.mark.parametrize('overrides, key', [
    (['model.attention=splash', 'model.attn_softcap=50'], 'model.attn_softcap'),
    (['model.mlp_activation=relu'], 'model.mlp_activation'),
    (['model.rope_scaling.kind=yarn'], 'model.rope_scaling.kind'),
    (['model.moe.num_experts=4', 'model.mlp_activation=gelu_tanh'], 'model.mlp_activation'),
    (['checkpoint.freeze_loaded_steps=5'], 'checkpoint.freeze_loaded_steps'),
    (['checkpoint.init_partial=true'], 'checkpoint.init_partial'),
    (['model.local_layers=-2', 'model.window=8'], 'model.local_layers'),
])
def test_pretrained_family_and_finetune_options_are_validated(overrides, key):
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    load_config(None, overrides)
