"""Hugging Face interop: safetensors checkpoints <-> gemjax Orbax checkpoints.

    python -m gemjax.convert import HF_DIR OUT_DIR [--param-dtype float32]
    python -m gemjax.convert export CHECKPOINT OUT_DIR [--dtype bfloat16]

`import` reads a Hugging Face model folder (config.json, model.safetensors
or sharded model-0000x-of-0000y.safetensors + index; tokenizer.json if
present) of a supported family (`families.FAMILIES`: Llama, Mistral,
Mixtral, Gemma 1/2/3 text) and writes OUT_DIR as a gemjax run directory:

    OUT_DIR/gemjax.yaml     the generated config (model section, tokenizer)
    OUT_DIR/tokenizer.json  copied from HF_DIR (gemjax reads it as is)
    OUT_DIR/0/state         {'params': ...} (Orbax), no optimizer state
    OUT_DIR/0/config        that config as JSON
    OUT_DIR/0/meta          format_version, the source family and config.json

so `checkpoint.init_from=OUT_DIR` fine-tunes from it and `eval.py` /
`generate.py` load it. Tensors are read one at a time from memory-mapped
files and written into the stacked (scanned-layer) arrays, so a sharded
checkpoint is never held in host memory twice. `export` writes the
reverse: config.json + model.safetensors (sharded past --max-shard-gb),
bit-exact to the imported tensors at the same dtype. Only the numpy and
safetensors libraries are needed (no torch).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gemjax import config as config_lib
from gemjax.convert import families as fam_lib
from gemjax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
STEP = 0


# ----------------------------------------------------------------- reading


class HFCheckpoint:
  """A Hugging Face model folder: its config.json and tensors by name,
  opened lazily (one memory-mapped file per shard)."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise ConfigError(f'{directory!r} is not a directory (expected a Hugging Face model '
                        'folder with config.json and *.safetensors)')
    cfg_path = os.path.join(directory, 'config.json')
    if not os.path.exists(cfg_path):
      raise ConfigError(f'{directory!r} has no config.json')
    try:
      with open(cfg_path) as f:
        self.config = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f'{cfg_path}: not valid JSON: {e}') from e
    self.files = self._tensor_files()

  def _tensor_files(self) -> dict[str, str]:
    """{tensor name: file} from the index, or from the single file."""
    index = os.path.join(self.directory, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ConfigError(f'{index}: no weight_map')
      out = {k: os.path.join(self.directory, v) for k, v in weight_map.items()}
      for path in sorted(set(out.values())):
        if not os.path.exists(path):
          raise ConfigError(f'{index} names {os.path.basename(path)}, which is missing')
      return out
    single = os.path.join(self.directory, 'model.safetensors')
    if not os.path.exists(single):
      found = [f for f in os.listdir(self.directory) if f.endswith(('.bin', '.pt', '.pth'))]
      hint = (f' (found {found[:3]}: PyTorch pickles are not read; save the model with '
              'safe_serialization=True)' if found else '')
      raise ConfigError(f'{self.directory!r} has no model.safetensors or '
                        f'model.safetensors.index.json{hint}')
    with safe_open(single, framework='np') as f:
      return {k: single for k in f.keys()}

  def names(self) -> set[str]:
    return set(self.files)

  def get(self, name: str) -> np.ndarray:
    path = self.files.get(name)
    if path is None:
      raise CheckpointError(f'{self.directory}: tensor {name!r} is missing '
                            f'(looked in {sorted(set(map(os.path.basename, self.files.values())))})')
    # Opened per tensor: a file kept open keeps every page read so far mapped
    # (resident), which for a sharded checkpoint adds up to the whole model.
    with safe_open(path, framework='np') as f:
      return f.get_tensor(name)

  def dtype(self) -> str:
    """The stored dtype of the embedding table ('bfloat16', 'float32', ...)."""
    name = 'model.embed_tokens.weight'
    path = self.files.get(name)
    if path is None:
      return 'float32'
    with safe_open(path, framework='np') as f:
      return {'BF16': 'bfloat16', 'F16': 'float16', 'F32': 'float32'}.get(
          f.get_slice(name).get_dtype(), 'float32')


# ------------------------------------------------------------------- import


def _period(m) -> int:
  return config_lib.layer_period(m)


def _layer_index(leaf: fam_lib.Leaf, group: int, period: int) -> int:
  return group * period + leaf.path[2]


def import_hf(hf_dir: str, out_dir: str, *, param_dtype: str = 'float32',
              overwrite: bool = False) -> config_lib.Config:
  """Converts a Hugging Face model folder into a gemjax run directory."""
  from gemjax.train import checkpoint as ckpt_lib
  from gemjax.train import state as state_lib

  src = HFCheckpoint(hf_dir)
  where = os.path.join(hf_dir, 'config.json')
  fam = fam_lib.family_of(src.config, where)
  model = fam_lib.model_config(src.config, where)
  model['param_dtype'] = param_dtype
  _prepare_out(out_dir, overwrite)
  tokenizer = None
  if os.path.exists(os.path.join(hf_dir, 'tokenizer.json')):
    shutil.copy(os.path.join(hf_dir, 'tokenizer.json'), os.path.join(out_dir, 'tokenizer.json'))
    tokenizer = os.path.join(out_dir, 'tokenizer.json')
  yaml_path = os.path.join(out_dir, 'gemjax.yaml')
  cfg = _write_config(yaml_path, model, tokenizer, hf_dir, fam.model_type)
  m = cfg.model
  fam_lib.check_model(m, where)
  period = _period(m)
  groups = m.num_layers // period
  leaves = fam_lib.leaves(m, fam, period)
  expected = fam_lib.known_hf_names(m, fam, period)
  unknown = sorted(n for n in src.names() - expected
                   if not n.endswith(('rotary_emb.inv_freq',)))
  if unknown:
    raise CheckpointError(f'{hf_dir}: tensors gemjax does not know how to place: '
                          f'{unknown[:5]} (a {fam.model_type} variant gemjax does not support?)')
  mdef = state_lib.model_def(m)
  abstract = ckpt_lib.flat_params(mdef.abstract_params)
  d = fam_lib.dims(m)
  dt = DTYPES[param_dtype]
  flat: dict[str, Any] = {}
  for leaf in leaves:
    key = '/'.join(str(p) for p in leaf.path)
    if key not in abstract:
      raise AssertionError(f'gemjax has no parameter {key}')  # a bug in families.py
    shape = abstract[key].shape
    arr = np.empty(shape, dt)
    for index, name in _hf_names(leaf, groups, period, m.moe.num_experts):
      t = src.get(name)
      try:
        arr[index] = leaf.to_gemjax(t, d).astype(dt)
      except ValueError as e:
        raise CheckpointError(f'{src.files[name]}: tensor {name} has shape {t.shape}, which '
                              f'does not fit gemjax parameter {key} {shape} '
                              f'(config.json says otherwise?): {e}') from e
    flat[key] = jax.device_put(arr)
    del arr
  # Parameters no HF tensor feeds (the modality embedding) keep gemjax's init.
  missing = sorted(set(abstract) - set(flat))
  for key in missing:
    if key != 'inputs/modality_MxD':
      raise AssertionError(f'no HF tensor for {key}')  # a bug in families.py
    flat[key] = np.zeros(abstract[key].shape, dt)
  params = ckpt_lib.unflatten_like(mdef.abstract_params, flat)
  meta = ckpt_lib.format_meta('gemjax.convert import', source={
      'model_type': fam.model_type, 'path': os.path.abspath(hf_dir),
      'dtype': src.dtype(), 'config': src.config})
  _save_step(out_dir, params, config_lib.to_dict(cfg), meta)
  log.info('imported %s (%s, %d tensors) into %s', hf_dir, fam.model_type, len(expected),
           out_dir)
  return cfg


def _hf_names(leaf: fam_lib.Leaf, groups: int, period: int,
              experts: int) -> Iterator[tuple[tuple, str]]:
  """(index into the gemjax array, HF tensor name) for every piece of a leaf."""
  if not leaf.per_layer:
    yield (), leaf.hf
    return
  if leaf.tail:
    yield (), leaf.hf.format(i=groups * period + leaf.path[2])
    return
  for g in range(groups):
    i = _layer_index(leaf, g, period)
    if leaf.per_expert:
      for e in range(experts):
        yield (g, e), leaf.hf.format(i=i, e=e)
    else:
      yield (g,), leaf.hf.format(i=i)


def _prepare_out(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise ConfigError(f'{out_dir!r} exists and is not empty; choose a new directory or '
                        'pass --overwrite')
    shutil.rmtree(out_dir)
  os.makedirs(out_dir, exist_ok=True)


def _write_config(path: str, model: dict, tokenizer: str | None, hf_dir: str,
                  model_type: str) -> config_lib.Config:
  import yaml
  doc = {'model': model}
  if tokenizer:
    doc['data'] = {'tokenizer': tokenizer}
  header = (f'# Generated by `python -m gemjax.convert import {hf_dir}` ({model_type}).\n'
            '# A text model of the pretrained vocabulary: to train it on gemjax data,\n'
            '# grow model.vocab_size and fine-tune (configs/finetune-multimodal.yaml).\n')
  with open(path, 'w') as f:
    f.write(header + yaml.safe_dump(doc, sort_keys=False))
  return config_lib.load_config(path)


def _save_step(out_dir: str, params: Any, config: dict, meta: dict) -> None:
  import orbax.checkpoint as ocp
  step_dir = os.path.abspath(os.path.join(out_dir, str(STEP)))
  # At most ~1 GB in flight: Orbax otherwise serialises every array at once,
  # a second copy of the whole model.
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1, use_ocdbt=False))
  ckptr.save(os.path.join(step_dir, 'state'), args=ocp.args.PyTreeSave({'params': params}))
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(
      os.path.join(step_dir, 'config'), args=ocp.args.JsonSave(config))
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(
      os.path.join(step_dir, 'meta'), args=ocp.args.JsonSave(meta))


# ----------------------------------------------------------------- finetune


def finetune_config(run_dir: str, preset: str, out_path: str | None = None) -> str:
  """Writes `run_dir`/finetune.yaml (or `out_path`): `preset` (e.g.
  configs/finetune-multimodal.yaml) on top of the imported model's config,
  fine-tuning from `run_dir`, with model.vocab_size grown to the run's
  vocabulary layout (pretrained text ids + gemjax's special tokens + the
  image codes of data.image_codes), rounded up to a multiple of 128."""
  import yaml
  from omegaconf import OmegaConf

  from gemjax.data import registry

  imported = os.path.join(run_dir, 'gemjax.yaml')
  if not os.path.exists(imported):
    raise ConfigError(f'{run_dir!r} has no gemjax.yaml (not a `gemjax.convert import` output)')
  if not os.path.exists(preset):
    raise ConfigError(f'fine-tuning preset {preset!r} does not exist')
  base = OmegaConf.to_container(OmegaConf.load(imported)) or {}
  top = OmegaConf.to_container(OmegaConf.load(preset)) or {}
  merged = OmegaConf.to_container(OmegaConf.merge(base, top))
  if 'tokenizer' not in (top.get('data') or {}) and (base.get('data') or {}).get('tokenizer'):
    merged.setdefault('data', {})['tokenizer'] = base['data']['tokenizer']
  merged.setdefault('checkpoint', {})['init_from'] = os.path.abspath(run_dir)
  out_path = out_path or os.path.join(run_dir, 'finetune.yaml')
  merged['model']['vocab_size'] = 1 << 30   # measured below
  with open(out_path, 'w') as f:
    yaml.safe_dump(merged, f, sort_keys=False)
  size = registry.text_tokenizer(config_lib.load_config(out_path)).layout.size
  merged['model']['vocab_size'] = -(-size // 128) * 128
  header = (f'# Generated by gemjax.convert from {preset} and {imported}.\n'
            f'# Vocabulary: {size} ids (pretrained text, gemjax specials, image codes), '
            f'rounded up to {merged["model"]["vocab_size"]}.\n')
  with open(out_path, 'w') as f:
    f.write(header + yaml.safe_dump(merged, sort_keys=False))
  config_lib.load_config(out_path)
  return out_path


# ------------------------------------------------------------------- export


def export_hf(checkpoint: str, out_dir: str, *, dtype: str | None = None,
              vocab_size: int = 0, max_shard_gb: float = 5.0, overwrite: bool = False,
              allow_modality_embedding: bool = False) -> dict:
  """Writes a gemjax checkpoint (run or step directory) as a Hugging Face
  model folder; returns the config.json written."""
  from gemjax.train import checkpoint as ckpt_lib
  from gemjax.train import restore

  step_dir = ckpt_lib.resolve_step_dir(checkpoint)
  meta = ckpt_lib.check_format(step_dir)
  cfg = restore.resolve_config(None, [f'eval.checkpoint={checkpoint}'])
  m = cfg.model
  where = str(step_dir)
  fam_lib.check_model(m, where)
  source = meta.get('source') or {}
  fam = fam_lib.family_for_export(m, source.get('model_type'), where)
  out_dtype = dtype or source.get('dtype') or m.param_dtype
  if out_dtype not in DTYPES:
    raise ConfigError(f'--dtype {out_dtype!r}: one of {sorted(DTYPES)}')
  vocab = vocab_size or m.vocab_size
  if not 0 < vocab <= m.vocab_size:
    raise ConfigError(f'--vocab-size {vocab_size}: must be in [1, model.vocab_size='
                      f'{m.vocab_size}]')
  params, _, _ = restore.load_for_eval(cfg)
  flat = ckpt_lib.flat_params(params)
  modality = flat.get('inputs/modality_MxD')
  if modality is not None and np.any(np.asarray(modality)[0]) and not allow_modality_embedding:
    raise ConfigError(
        f'{where}: parameter inputs/modality_MxD has a non-zero text row (max |x| = '
        f'{float(np.max(np.abs(np.asarray(modality)[0]))):.3g}), which {fam.model_type} '
        'cannot represent; export would change the model. Pass '
        '--allow-modality-embedding to drop it anyway.')
  _prepare_out(out_dir, overwrite)
  period = _period(m)
  groups = m.num_layers // period
  d = fam_lib.dims(m)
  dt = DTYPES[out_dtype]

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for leaf in fam_lib.leaves(m, fam, period):
      arr = np.asarray(flat['/'.join(str(p) for p in leaf.path)])
      for index, name in _hf_names(leaf, groups, period, m.moe.num_experts):
        t = leaf.to_hf(arr[index], d)
        if name in ('model.embed_tokens.weight', 'lm_head.weight'):
          t = t[:vocab]
        yield name, np.ascontiguousarray(t.astype(dt))

  _write_safetensors(out_dir, tensors(), int(max_shard_gb * 2 ** 30))
  hf = fam_lib.hf_config(m, fam, source.get('config'))
  hf['vocab_size'] = vocab
  hf['dtype'] = hf['torch_dtype'] = out_dtype
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  tok = os.path.join(os.path.dirname(os.path.abspath(str(step_dir))), 'tokenizer.json')
  if cfg.data.tokenizer.endswith('.json') and os.path.exists(cfg.data.tokenizer):
    tok = cfg.data.tokenizer
  if os.path.exists(tok):
    shutil.copy(tok, os.path.join(out_dir, 'tokenizer.json'))
  log.info('exported %s as %s (%s) to %s', checkpoint, fam.model_type, out_dtype, out_dir)
  return hf


def _write_safetensors(out_dir: str, tensors: Iterator[tuple[str, np.ndarray]],
                       max_bytes: int) -> None:
  """One model.safetensors, or shards of at most `max_bytes` plus the index
  (each shard is written as soon as it is full)."""
  files: list[list[str]] = []   # tensor names per written shard
  shard: dict[str, np.ndarray] = {}
  size = 0

  def flush():
    save_file(shard, os.path.join(out_dir, f'part-{len(files)}.safetensors'),
              metadata={'format': 'pt'})
    files.append(list(shard))
    shard.clear()

  for name, t in tensors:
    if shard and size + t.nbytes > max_bytes:
      flush()
      size = 0
    shard[name] = t
    size += t.nbytes
  if shard:
    flush()
  total = len(files)
  names = (['model.safetensors'] if total == 1 else
           [f'model-{i:05d}-of-{total:05d}.safetensors' for i in range(1, total + 1)])
  for i, name in enumerate(names):
    os.replace(os.path.join(out_dir, f'part-{i}.safetensors'), os.path.join(out_dir, name))
  if total > 1:
    weight_map = {k: name for name, keys in zip(names, files) for k in keys}
    with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': dict(sorted(weight_map.items()))}, f, indent=2)


__all__ = ['HFCheckpoint', 'export_hf', 'finetune_config', 'import_hf']
