"""Hugging Face interop: gemjax.convert against transformers' own models.

Small random models of each family are built with transformers at test time
(no download), saved as safetensors, imported, run by gemjax and compared
with transformers' logits on the same tokens (float32, atol 1e-4), exported
back (bit-exact tensors), and reloaded by transformers.
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from gemjax import convert
from gemjax.batch import text_batch
from gemjax.errors import CheckpointError, ConfigError
from gemjax.parallel import sharding as shd
from gemjax.train import restore

ATOL = 1e-4
SEQ = 24
VOCAB = 320

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    'llama': lambda: transformers.LlamaConfig(
        **COMMON, num_hidden_layers=2, tie_word_embeddings=False,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
                         'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 16}),
    'mistral': lambda: transformers.MistralConfig(
        **COMMON, num_hidden_layers=2, sliding_window=8, tie_word_embeddings=False),
    'mixtral': lambda: transformers.MixtralConfig(
        **COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False),
    'gemma': lambda: transformers.GemmaConfig(**COMMON, num_hidden_layers=2, head_dim=16),
    'gemma2': lambda: transformers.Gemma2Config(
        **COMMON, num_hidden_layers=4, head_dim=16, sliding_window=8,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    # 5 layers of period 3 (S S F): one scanned group plus a tail of two
    # sliding layers, as Gemma 3 1B's 26 layers of period 6 end.
    'gemma3_text': lambda: transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=5, head_dim=16, sliding_window=8,
        layer_types=['sliding_attention', 'sliding_attention', 'full_attention',
                     'sliding_attention', 'sliding_attention'], query_pre_attn_scalar=24,
        rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 2.0,
                                            'rope_theta': 1e6},
                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}}),
}


def _randomize(model: torch.nn.Module, plus_one: bool, seed: int) -> None:
  """Weights at the scale of a trained model (the default init leaves norms
  at identity and logits near zero, which would hide convention errors)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:   # norm scales: around identity in the family's convention
        p.copy_((0.0 if plus_one else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
      elif 'embed_tokens' in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _hf_model(family: str, directory: str, dtype=torch.float32):
  cfg = FAMILIES[family]()
  cfg._attn_implementation = 'eager'
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  _randomize(model, plus_one=family.startswith('gemma'), seed=1)
  model.to(dtype).save_pretrained(directory)
  return model.float()


def _tokens(seed=0, batch=8):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, SEQ)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _gemjax_logits(run_dir, tokens, overrides=()):
  cfg = restore.resolve_config(os.path.join(run_dir, 'gemjax.yaml'),
                               [f'eval.checkpoint={run_dir}', *overrides])
  params, mdef, mesh = restore.load_for_eval(cfg)
  with shd.use_mesh(mesh):
    model = nnx.merge(mdef.graphdef, params)
    logits, _, _ = model(text_batch(tokens))
  return np.asarray(logits)


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def imported(request, tmp_path_factory):
  family = request.param
  root = tmp_path_factory.mktemp(family)
  hf_dir, run_dir = str(root / 'hf'), str(root / 'gemjax')
  model = _hf_model(family, hf_dir)
  convert.import_hf(hf_dir, run_dir)
  return family, model, hf_dir, run_dir


def test_logits_equal_transformers(imported):
  family, model, _, run_dir = imported
  tokens = _tokens()
  want = _hf_logits(model, tokens)
  got = _gemjax_logits(run_dir, tokens)
  assert got.shape == want.shape
  err = float(np.max(np.abs(got - want)))
  print(f'{family}: max |logit diff| = {err:.2e} (logit std {want.std():.2f})')
  assert want.std() > 0.5, 'the test model is too close to trivial to compare'
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate(imported):
  # Prefill + cached decode steps: rolling sliding-window caches, the tail,
  # soft-capped scores over the cache, local/global RoPE at decode positions.
  from gemjax.inference.decode import Sampler
  family, model, _, run_dir = imported
  prompt = _tokens(seed=2)[:, :12]
  new = 10
  with torch.no_grad():
    want = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0).numpy()[:, prompt.shape[1]:]
  cfg = restore.resolve_config(os.path.join(run_dir, 'gemjax.yaml'),
                               [f'eval.checkpoint={run_dir}'])
  params, mdef, mesh = restore.load_for_eval(cfg)
  sampler = Sampler(graphdef=mdef.graphdef, params=params, mesh=mesh)
  got = sampler.generate(text_batch(prompt), max_new_tokens=new, max_len=prompt.shape[1] + new)
  np.testing.assert_array_equal(np.asarray(got.tokens_BxN), want)


def _tensors(directory):
  index = os.path.join(directory, 'model.safetensors.index.json')
  files = (sorted(set(json.load(open(index))['weight_map'].values())) if os.path.exists(index)
           else ['model.safetensors'])
  out = {}
  for name in files:
    with safe_open(os.path.join(directory, name), framework='np') as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
  return out


def test_export_round_trips_bit_exactly_and_loads_in_transformers(imported, tmp_path):
  family, model, hf_dir, run_dir = imported
  out = str(tmp_path / 'exported')
  # A small shard limit: the sharded layout and its index are exercised too.
  convert.export_hf(run_dir, out, max_shard_gb=64 / 2 ** 20)
  assert os.path.exists(os.path.join(out, 'model.safetensors.index.json'))
  src, dst = _tensors(hf_dir), _tensors(out)
  assert sorted(src) == sorted(dst)
  for k in src:
    assert src[k].dtype == dst[k].dtype and src[k].shape == dst[k].shape, k
    assert src[k].tobytes() == dst[k].tobytes(), f'{k} differs after import -> export'
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation='eager').eval()
  tokens = _tokens(seed=1, batch=2)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))


def test_bfloat16_checkpoint_round_trips_through_float32(tmp_path):
  hf_dir, run_dir, out = (str(tmp_path / n) for n in ('hf', 'gemjax', 'out'))
  _hf_model('llama', hf_dir, dtype=torch.bfloat16)
  convert.import_hf(hf_dir, run_dir, param_dtype='float32')
  convert.export_hf(run_dir, out)   # the source dtype (bfloat16) by default
  src, dst = _tensors(hf_dir), _tensors(out)
  for k in src:
    assert str(dst[k].dtype) == 'bfloat16' and src[k].tobytes() == dst[k].tobytes(), k


def test_unsupported_architecture_names_the_file(tmp_path):
  d = tmp_path / 'qwen'
  d.mkdir()
  (d / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  save_file({'x': np.zeros(2, np.float32)}, str(d / 'model.safetensors'))
  with pytest.raises(ConfigError, match=r"config.json: model_type 'gpt2' is not supported"):
    convert.import_hf(str(d), str(tmp_path / 'out'))


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  root = tmp_path_factory.mktemp('llama_errors')
  hf_dir, run_dir = str(root / 'hf'), str(root / 'gemjax')
  _hf_model('llama', hf_dir)
  convert.import_hf(hf_dir, run_dir)
  return hf_dir, run_dir


def test_missing_tensor_names_the_file_and_tensor(llama, tmp_path):
  hf_dir, _ = llama
  broken = tmp_path / 'broken'
  broken.mkdir()
  tensors = _tensors(hf_dir)
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(broken / 'model.safetensors'))
  (broken / 'config.json').write_text(open(os.path.join(hf_dir, 'config.json')).read())
  with pytest.raises(CheckpointError,
                     match=r"broken: tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
    convert.import_hf(str(broken), str(tmp_path / 'out'))


def test_a_newer_checkpoint_format_is_refused_naming_both_versions(llama, tmp_path):
  _, run_dir = llama
  import shutil
  copy = str(tmp_path / 'future')
  shutil.copytree(run_dir, copy)
  meta_file = os.path.join(copy, '0', 'meta', 'metadata')
  meta = json.load(open(meta_file))
  meta['format_version'] = 99
  json.dump(meta, open(meta_file, 'w'))
  with pytest.raises(CheckpointError, match=r'format_version 99 .* reads versions \[0, 1\]'):
    _gemjax_logits(copy, _tokens(batch=8))


def test_non_periodic_layer_pattern_is_refused_clearly(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  cfg = FAMILIES['gemma3_text']()
  cfg.layer_types = ['sliding_attention', 'full_attention', 'full_attention',
                     'sliding_attention', 'full_attention']
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(hf_dir)
  with pytest.raises(ConfigError, match=r'layer pattern .* is not whole repeats'):
    convert.import_hf(hf_dir, str(tmp_path / 'out'))


def test_export_refuses_gemjax_own_architecture(tmp_path):
  from gemjax.train.loop import Trainer
  from gemjax.config import load_config
  cfg = load_config(None, ['train.steps=1', f'train.run_dir={tmp_path / "run"}',
                           'checkpoint.every=1', 'train.progress_bar=false',
                           'train.tensorboard=false'])
  trainer = Trainer.create(cfg)
  trainer.save(0, force=True)
  trainer.checkpointer.close()
  with pytest.raises(ConfigError, match='has no Hugging Face family'):
    convert.export_hf(str(tmp_path / 'run'), str(tmp_path / 'out'))


@pytest.mark.slow
def test_command_line_import_finetune_export_and_errors(llama, tmp_path):
  import subprocess
  import sys
  hf_dir, _ = llama
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  run = lambda *a: subprocess.run([sys.executable, '-m', 'gemjax.convert', *a], cwd=root,
                                  env=env, capture_output=True, text=True, timeout=300)
  out = str(tmp_path / 'gj')
  r = run('import', hf_dir, out)
  assert r.returncode == 0, r.stderr
  assert 'wrote' in r.stdout and os.path.exists(os.path.join(out, 'gemjax.yaml'))
  r = run('import', hf_dir, out)   # not empty: refused, nothing overwritten
  assert r.returncode == 2 and 'exists and is not empty' in r.stderr
  r = run('export', out, str(tmp_path / 'hf'), '--vocab-size', '100')
  assert r.returncode == 0, r.stderr
  cfg = json.load(open(tmp_path / 'hf' / 'config.json'))
  assert cfg['vocab_size'] == 100 and cfg['architectures'] == ['LlamaForCausalLM']
  assert _tensors(str(tmp_path / 'hf'))['model.embed_tokens.weight'].shape == (100, 64)
  r = run('import', str(tmp_path / 'nowhere'), str(tmp_path / 'x'))
  assert r.returncode == 2 and 'nowhere' in r.stderr and 'is not a directory' in r.stderr
