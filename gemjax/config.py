"""Typed run configuration: nested dataclasses, YAML presets, dotted overrides.

A run is described by one `Config` made of small sections (model, mesh,
optimizer, train, checkpoint, data, eval). Presets in `configs/*.yaml` say only
what differs from the defaults below; the command line adds dotted overrides:

    python train.py configs/nano.yaml model.num_layers=8 mesh.fsdp=2

OmegaConf does the merging and type checking; this module turns its errors into
`ConfigError`s that name the key, the value and what would be valid, and adds
the cross-field checks OmegaConf cannot know (heads divisible by the KV heads,
the layer count a multiple of the layer pattern, ...). The checks that need the
device count live in `gemjax.parallel.mesh`.

Only the code that *builds* things (the decoder, the mesh, the optimizer, the
data source) reads these sections; layers take plain numbers. Imports nothing
from the rest of gemjax except `errors`: no model, data or jax code, so a
preset loads and validates with only omegaconf (tests/test_names.py checks the
name tables below against the tables that implement them).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from typing import Any, Sequence

import omegaconf
from omegaconf import OmegaConf

from gemjax.errors import ConfigError

REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_qkv_proj')
DTYPES = ('float32', 'bfloat16', 'float16')
# The config language's names. The tables that implement them
# (gemjax.model.attention.KERNELS, gemjax.data.registry.SOURCES,
# gemjax.parallel.layouts.LAYOUTS) are checked against these by tests.
ATTENTION_KINDS = ('blockwise', 'dense', 'ring', 'splash', 'cudnn', 'infini')
MLP_KINDS = ('swiglu',)
MLP_ACTIVATIONS = ('silu', 'gelu_tanh')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
# Attention kinds that implement model.attn_softcap.
SOFTCAP_KERNELS = ('blockwise', 'dense', 'ring')
MOE_PATHS = ('auto', 'capacity', 'dropless')
INFINI_UPDATES = ('linear', 'delta')
CONTEXT_LAYOUTS = ('contiguous', 'zigzag', 'striped')
# Built-in data sources; `gemjax.data.registry.register_source` appends a
# plug-in's name here, so a user source validates like a built-in one.
DATA_SOURCES = ['synthetic', 'text_file', 'grain', 'passkey']


@dataclasses.dataclass
class MoEConfig:
  # 0 = dense model (no MoE layers).
  num_experts: int = 0
  top_k: int = 2
  # An MoE feed-forward replaces the dense one in every n-th layer.
  moe_every: int = 1
  # Hidden size of each expert; 0 = model.mlp_dim.
  expert_dim: int = 0
  shared_experts: int = 0
  renormalize: bool = True
  capacity_factor: float = 1.25
  # 'auto' (= capacity, on every backend until dropless's real
  # ragged_all_to_all has run on an accelerator) | 'capacity' | 'dropless'.
  # Capacity groups are per-device chunks of a row: with drops, its outputs
  # depend on mesh.context and mesh.context_layout (gemjax/model/moe.py).
  path: str = 'auto'
  # Dropless + expert parallel: rows of each device's receive buffer. 0 = the
  # worst case (P shards x N tokens per device x min(top_k, experts / P)),
  # nothing dropped; f >= 1 = ceil(f x N x top_k) rounded up to 8 (f times a
  # perfectly balanced load), overflow dropped and counted in moe_dropped
  # (gemjax/parallel/expert.py).
  dropless_buffer_factor: float = 0.0
  router_z_loss: float = 1e-3
  load_balance_loss: float = 1e-2


@dataclasses.dataclass
class InfiniConfig:
  segment_len: int = 128
  # 'linear' | 'delta' (Munkhdalai et al. 2024, eq. 4-5).
  update: str = 'delta'
  # Learning-rate multiplier of the per-head memory gate (no weight decay).
  gate_lr_mult: float = 1.0


@dataclasses.dataclass
class RopeScalingConfig:
  # Context extension of a pretrained model's rotary frequencies (as Hugging
  # Face's rope_parameters): 'none' | 'linear' (positions / factor) |
  # 'llama3' (Llama 3.1's per-frequency blend of the two). Applies to global
  # layers, and to sliding-window layers unless model.local_rope_base is set.
  kind: str = 'none'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


@dataclasses.dataclass
class ModelConfig:
  vocab_size: int = 512
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  rope_base: float = 10_000.0
  # Fractions (t, h, w) of the rotary frequency pairs for multimodal RoPE.
  # On text (t = h = w) any split equals plain 1D RoPE. Typed as any length so
  # that a wrong one reaches validate() and its message, not OmegaConf's.
  mrope_sections: tuple[int, ...] = (2, 1, 1)
  qk_norm: bool = True
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  # Pretrained-family options (gemjax.convert sets them; the defaults are
  # gemjax's own architecture). RMSNorm scale as (1 + w), zero-initialised
  # (gemjax, Gemma), or as w itself, one-initialised (Llama, Mistral, Mixtral).
  norm_plus_one: bool = True
  # Feed-forward gate: 'silu' (SwiGLU) | 'gelu_tanh' (GeGLU, Gemma).
  mlp_activation: str = 'silu'
  # Token embeddings times sqrt(d_model) (Gemma).
  embed_scale: bool = False
  # Sandwich norms: a second RMSNorm on each sublayer's output before the
  # residual add (Gemma 2 and 3).
  post_norms: bool = False
  # Soft-capping cap * tanh(x / cap) of the attention scores and of the output
  # logits (Gemma 2); 0 = off.
  attn_softcap: float = 0.0
  final_softcap: float = 0.0
  # Attention scores scale; 0 = head_dim ** -0.5 (Gemma 2/3 use
  # query_pre_attn_scalar ** -0.5).
  query_scale: float = 0.0
  # RoPE base of the sliding-window layers; 0 = model.rope_base (Gemma 3
  # uses 10k locally and 1M globally).
  local_rope_base: float = 0.0
  rope_scaling: RopeScalingConfig = dataclasses.field(default_factory=RopeScalingConfig)
  z_loss: float = 1e-4
  # Tokens per chunk of the output head + loss (0 = all at once): with a
  # large vocabulary the [batch, seq, vocab] f32 logits dominate a chip's
  # memory; chunks compute (and recompute in the backward) one slice at a
  # time (gemjax/model/loss.py chunked_cross_entropy). Must divide seq_len.
  loss_chunk: int = 0
  # Attention sublayer / kernel: 'blockwise' | 'dense' | 'ring' | 'splash' |
  # 'cudnn' | ... (registry). 'blockwise' is exact, never materialises the
  # [T, S] matrix and skips fully masked chunks (causal, windows, packing).
  attention: str = 'blockwise'
  # Query/key chunk of the blockwise and ring kernels (128 suits CPU caches;
  # 512 suits TPU/GPU).
  attention_block: int = 512
  # Local + global: `local_layers` sliding-window layers, then one global one
  # (-1: every layer slides, Mistral v0.1).
  # A query sees the `window` most recent tokens, itself included (tokens of
  # one media block always see each other). The window bounds the past only:
  # a non-causal kernel call with a window sees every later key
  # (one-sided; gemjax/kernels/mask.py).
  local_layers: int = 0
  window: int = 0
  mlp: str = 'swiglu'
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  infini: InfiniConfig = dataclasses.field(default_factory=InfiniConfig)
  scan_layers: bool = True
  remat: str = 'none'
  param_dtype: str = 'float32'
  # 'auto': float32 on CPU, bfloat16 on GPU/TPU.
  compute_dtype: str = 'auto'
  init_std: float = 0.02
  # Continuous inputs: flattened patch size per modality (0 = no embedder).
  # Defaults match gemjax.tokenizers: 14x14x3 image/video patches, 4x64 mel.
  image_patch_dim: int = 588
  audio_patch_dim: int = 256
  video_patch_dim: int = 588
  # Video frames go through the image patch embedder (one visual embedding,
  # as one vision encoder serves images and frames): what is learnt from
  # images reads frames too. Needs image_patch_dim == video_patch_dim.
  share_visual_embedder: bool = False
  # Per-modality encoder blocks before the decoder: 0 = early fusion,
  # > 0 = the late-fusion baseline. `freeze_encoder` keeps them fixed.
  encoder_layers: int = 0
  freeze_encoder: bool = False


@dataclasses.dataclass
class MeshConfig:
  # Sizes of the mesh axes within one slice (ICI); exactly one may be -1
  # (fills the remaining devices of a slice).
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  context: int = 1
  tensor: int = 1
  # Token layout when the sequence is split over 'context' (ring attention):
  # 'zigzag' | 'striped' | 'contiguous' (gemjax/parallel/layouts.py).
  context_layout: str = 'zigzag'
  # Multislice: how many slices (joined over the data-center network, DCN)
  # the data / fsdp axis spans; the mesh axis is then mesh.data x dcn_data
  # devices. The product of the dcn_* sizes is the number of slices; 1 = one.
  dcn_data: int = 1
  dcn_fsdp: int = 1
  # Multi-host: call jax.distributed.initialize() before anything else.
  # Address, process count and id are discovered on Cloud TPU; elsewhere set
  # all three (e.g. '10.0.0.1:1234', 2, 0|1).
  distributed: bool = False
  coordinator_address: str = ''
  num_processes: int = 0
  process_id: int = -1
  # A process that sends no heartbeat for this many seconds is declared dead:
  # the others log which one and exit with code 4 instead of waiting forever
  # in a collective (gemjax/train/loop.py PeerWatchdog). JAX's own check,
  # which aborts the process, is set to 3 x this + 10 s as a backstop.
  heartbeat_timeout_s: int = 60
  # How long jax.distributed.initialize waits for every process to connect.
  initialization_timeout_s: int = 300


@dataclasses.dataclass
class OptimizerConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  # Cosine decay length; 0 = until train.steps.
  decay_steps: int = 0
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0


@dataclasses.dataclass
class TrainConfig:
  steps: int = 200
  batch_size: int = 8
  seq_len: int = 128
  seed: int = 0
  run_dir: str = 'runs/nano'
  log_every: int = 10
  progress_bar: bool = True
  tensorboard: bool = True
  # Stop (with a checkpoint) after this many non-finite losses in a row.
  max_nonfinite_steps: int = 5
  # Peak FLOP/s per device for MFU; 0 = datasheet on GPU/TPU, measured on CPU.
  peak_flops: float = 0.0
  # [start, end]: a jax.profiler trace from when `start` steps are done until
  # `end` are, written to <run_dir>/profile; [] = off (gemjax/train/profile.py).
  profile_steps: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CheckpointConfig:
  every: int = 100
  keep: int = 3
  async_save: bool = True
  # Resume from the newest complete checkpoint in train.run_dir.
  resume: bool = True
  # Fine-tune: take parameters (only) from this Orbax checkpoint (a run or
  # step directory, or the output of `python -m gemjax.convert import`).
  init_from: str = ''
  # Fine-tune a larger model (a text LLM into a multimodal one): parameters
  # init_from lacks (patch embedders) keep their fresh initialisation, and
  # vocabulary rows beyond its vocabulary (gemjax's special tokens, image
  # codes) start at the mean of the loaded rows plus their fresh values.
  init_partial: bool = False
  # For the first N steps only those new parameters and rows are trained
  # (the loaded ones get a zero update); 0 = train everything from the start.
  freeze_loaded_steps: int = 0


@dataclasses.dataclass
class DatasetConfig:
  # ArrayRecord shards (glob/prefix/dir), a folder, a .jsonl manifest, or 'tfds:NAME'.
  path: str = ''
  weight: float = 1.0
  # 'auto' | 'array_record' | 'folder' | 'jsonl' | 'tfds' | 'pairs' | 'image_video'
  kind: str = 'auto'
  # TFDS split / data_dir (TFDS only).
  split: str = 'train'
  data_dir: str = ''
  # kind 'pairs' (gemjax/data/pairs.py): matching examples composed on the fly
  # from `path` and `pair_with` (same split), half with equal meta[pair_label].
  # kind 'image_video' (gemjax/data/compose.py): videos composed on the fly
  # from the labelled images of `path`, `compose_frames` [min, max] distinct
  # images at `compose_fps`, answered with their meta[pair_label] in order.
  # Both: pair_prompt is the question, pair_task the task name.
  pair_with: str = ''
  pair_label: str = 'digit'
  pair_prompt: str = ''
  pair_task: str = 'match'
  # Distinct composed examples per epoch; 0 = len(path) x len(pair_with)
  # ('pairs'), len(path) ('image_video').
  pair_size: int = 0
  compose_frames: list[int] = dataclasses.field(default_factory=lambda: [3, 5])
  compose_fps: float = 1.0
  # Classifier-free guidance training (gemjax/data/condition.py): the
  # probability that a training record loses its prompt (the unpredicted text
  # before its first predicted image). Training only; in [0, 1).
  cond_dropout: float = 0.0
  # Media augmentation (gemjax/data/augment.py), training only: the
  # probability that an input image or video frame (shift, scale, rotation,
  # contrast) / audio clip (speed, pitch, reverb, noise, telephone band,
  # volume) of a record is augmented. In [0, 1]; 0 = off.
  augment_image: float = 0.0
  augment_audio: float = 0.0
  # Multiplies the loss weights of this dataset's predicted tokens (training
  # only; the loss is a weighted mean, so this sets the dataset's share of
  # the gradient per predicted token, where `weight` sets its share of the
  # examples). > 0.
  loss_weight: float = 1.0


@dataclasses.dataclass
class DataConfig:
  # 'synthetic' | 'text_file' | 'grain' (the multimodal Grain pipeline).
  source: str = 'synthetic'
  # text_file: UTF-8 files read as bytes.
  train_path: str = ''
  eval_path: str = ''
  # grain: the training mixture and the evaluation datasets.
  datasets: list[DatasetConfig] = dataclasses.field(default_factory=list)
  eval_datasets: list[DatasetConfig] = dataclasses.field(default_factory=list)
  # Text tokenizer (gemjax/tokenizers/text.py): 'bytes', a SentencePiece
  # .model file, or a Hugging Face tokenizer.json (or a model folder holding
  # one). Its vocabulary comes first; model.vocab_size >= VocabLayout.size.
  tokenizer: str = 'bytes'
  # Directory of a saved ImageCodeTokenizer ('' = none): predicted images are
  # trained as its discrete codes, and the vocabulary reserves its num_codes.
  image_codes: str = ''
  # Max patches per packed row for each continuous modality (0 = none).
  image_patches: int = 64
  audio_patches: int = 64
  video_patches: int = 0
  # Tokenizer settings (patch sizes must match model.*_patch_dim).
  image_patch_size: int = 14
  image_max_tokens: int = 256
  audio_patch_frames: int = 4
  audio_patch_mels: int = 64
  video_fps: float = 1.0
  video_max_frames: int = 8
  video_frame_tokens: int = 64
  # Loss weight of predicted tokens by segment kind.
  loss_weight_text: float = 1.0
  loss_weight_image_code: float = 1.0
  # 'skip' (count + log) or 'strict' (raise naming source and index).
  bad_records: str = 'skip'
  # Per-process LRU cache of tokenized media (MB; 0 = off): a small corpus
  # seen for many epochs is decoded once. Same tokens either way.
  media_cache_mb: float = 0
  num_workers: int = 0
  # Threads numpy's BLAS may use in this process (0 = its default, one per
  # core). The data pipeline's parallelism is its read threads, and XLA owns
  # the cores during a step: a multi-threaded BLAS spins against both
  # (BENCHMARKS.md, "make run time").
  blas_threads: int = 1


@dataclasses.dataclass
class EvalConfig:
  # Run directory or step directory to evaluate; '' = train.run_dir.
  checkpoint: str = ''
  # Packed batches of the eval split for loss / perplexity.
  batches: int = 8
  # Per-task accuracy (grain data): rows per forward pass; 0 = every record.
  task_batch_size: int = 16
  max_records: int = 0
  # Where the report goes; '' = <checkpoint run dir>/eval.
  out_dir: str = ''
  # Passkey grid (data.source='passkey'): row lengths in bytes
  # ([] = train.seq_len x 1, 2, 4, 8) and rows per (depth, length) cell.
  passkey_lengths: list[int] = dataclasses.field(default_factory=list)
  passkey_samples: int = 16
  # Also measure task accuracy and the passkey grid by greedy generation
  # with the KV cache (gemjax.inference), next to the teacher-forced numbers.
  generate: bool = True
  # Records whose answer is an image (data.image_codes): drawn by constrained
  # decoding with classifier-free guidance at this scale (1 = none), sampled
  # at this temperature (0 = greedy) from the top_k codes (0 = all).
  guidance_scale: float = 3.0
  image_temperature: float = 1.0
  image_top_k: int = 0
  # During training: evaluate the current parameters every this many steps
  # and at the last step (0 = off); the eval-split loss over `batches` packed
  # batches (overall, per modality) and, on Grain data, per-task accuracy on
  # the first `train_max_records` records of each eval dataset (0 = all).
  # Teacher-forced only, to stay cheap; generation and drawing are eval.py's.
  # Logged as split 'eval' to metrics.jsonl and TensorBoard (eval/...).
  every: int = 0
  train_max_records: int = 64


@dataclasses.dataclass
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


# ------------------------------------------------------------------ loading


def _known_keys(node: Any, prefix: str = '') -> list[str]:
  keys = []
  for f in dataclasses.fields(node):
    value = getattr(node, f.name)
    path = f'{prefix}{f.name}'
    keys.append(path)
    if dataclasses.is_dataclass(value):
      keys.extend(_known_keys(value, path + '.'))
  return keys


def _type_at(key: str) -> Any:
  """The declared type of a dotted key, through list entries:
  'data.datasets.0.weight' (or OmegaConf's 'data.datasets[0].weight') -> float.
  KeyError for a key the dataclasses do not declare."""
  t: Any = Config
  for part in key.replace('[', '.').replace(']', '').split('.'):
    if typing.get_origin(t) is list and part.isdigit():
      t = typing.get_args(t)[0]
    elif dataclasses.is_dataclass(t) and part in typing.get_type_hints(t):
      t = typing.get_type_hints(t)[part]
    else:
      raise KeyError(key)
  return t


def _type_name(t: Any) -> str:
  return t.__name__ if isinstance(t, type) else str(t)


def _list_prefix(key: str) -> str | None:
  """'data.datasets.0.weight' -> 'data.datasets': the list field a key goes
  *into* (an entry or an entry's field); None for any other key."""
  t: Any = Config
  parts = key.split('.')
  for i, part in enumerate(parts):
    if typing.get_origin(t) is list:
      return '.'.join(parts[:i])
    if not dataclasses.is_dataclass(t) or part not in typing.get_type_hints(t):
      return None
    t = typing.get_type_hints(t)[part]
  return None


def _unknown_key_error(key: str, where: str) -> ConfigError:
  known = _known_keys(Config())
  close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  hint = f"; did you mean '{close[0]}'?" if close else ''
  return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _check_keys(tree: Any, where: str, prefix: str = '') -> None:
  """Rejects unknown keys before OmegaConf sees them (for a better message)."""
  known = set(_known_keys(Config()))
  if not isinstance(tree, dict):
    raise ConfigError(f'{where}: expected a mapping of config sections, got '
                      f'{type(tree).__name__}')
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if path not in known:
      raise _unknown_key_error(path, where)
    if isinstance(v, dict):
      _check_keys(v, where, path + '.')
    elif isinstance(v, list) and typing.get_origin(_type_at(path)) is list:
      entry_type = typing.get_args(_type_at(path))[0]
      if not dataclasses.is_dataclass(entry_type):
        continue
      names = [f.name for f in dataclasses.fields(entry_type)]
      for i, entry in enumerate(v):
        if isinstance(entry, dict):
          for ek in entry:
            if ek not in names:
              close = difflib.get_close_matches(ek, names, n=1)
              hint = f"; did you mean '{close[0]}'?" if close else ''
              raise ConfigError(f"{where}: unknown key '{path}[{i}].{ek}'{hint}")


def _parse_value(value: str) -> Any:
  """A command-line value parsed as OmegaConf's dotlist parses it (YAML)."""
  return OmegaConf.from_dotlist([f'value={value}'])['value']


def _set_list_entry(merged: Any, key: str, list_key: str, value: str,
                    where: str) -> None:
  """`data.datasets.0.weight=3`: sets a field of an entry that exists (the
  preset made the list), naming the list length or the entry's fields."""
  entries = OmegaConf.select(merged, list_key)
  index, *rest = key[len(list_key) + 1:].split('.')
  if not index.isdigit():
    raise ConfigError(f"{where}: '{key}': entries of {list_key} are addressed by "
                      f'index ({list_key}.0, {list_key}.1, ...), got {index!r}')
  n = len(entries)
  if int(index) >= n:
    valid = (f'valid indices are 0..{n - 1}' if n else
             f'set the whole list instead, e.g. {list_key}=[...]')
    raise ConfigError(f"{where}: '{key}': index {index} is out of range; {list_key} "
                      f'has {n} entries; {valid}')
  entry_type = typing.get_args(_type_at(list_key))[0]
  if rest:
    if not dataclasses.is_dataclass(entry_type):
      raise ConfigError(f"{where}: '{key}': entries of {list_key} are "
                        f'{_type_name(entry_type)} values, they have no fields')
    names = [f.name for f in dataclasses.fields(entry_type)]
    if len(rest) > 1 or rest[0] not in names:
      close = difflib.get_close_matches(rest[0], names, n=1)
      hint = f"; did you mean '{list_key}.{index}.{close[0]}'?" if close else ''
      raise ConfigError(f"{where}: unknown config key '{key}'{hint} (entries of "
                        f"{list_key} have the fields {', '.join(names)})")
  try:
    OmegaConf.update(merged, key, _parse_value(value), merge=True)
  except omegaconf.errors.OmegaConfBaseException as e:
    raise ConfigError(f'{where}: {key}={value!r} is not a valid '
                      f'{_type_name(_type_at(key))}') from e


def _merge(merged: Any, layer: Any, where: str, key: str | None = None) -> Any:
  """OmegaConf.merge with its errors turned into ones that name the key;
  `key` is the override's own key, for errors OmegaConf does not locate."""
  try:
    return OmegaConf.merge(merged, layer)
  except omegaconf.errors.ValidationError as e:
    key = getattr(e, 'full_key', None) or key
    if not key:
      raise ConfigError(f'{where}: {e}') from e
    raise ConfigError(f'{where}: {key}={_value_of(layer, key)!r} is not a '
                      f'valid {_expected_type(key)}') from e
  except omegaconf.errors.OmegaConfBaseException as e:
    raise ConfigError(f'{where}: {e}') from e


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
  """Defaults <- YAML preset <- dotted overrides, then validation.

  An override may reach into a list the preset wrote:
  `data.datasets.0.weight=3` sets a field of the first dataset entry.
  """
  merged = OmegaConf.structured(Config)
  if path:
    if not os.path.exists(path):
      raise ConfigError(f'config file {path!r} does not exist')
    try:
      raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # yaml syntax errors
      raise ConfigError(f'config file {path!r} is not valid YAML: {e}') from e
    raw = raw or {}
    _check_keys(raw, path)
    merged = _merge(merged, OmegaConf.create(raw), path)
  for item in overrides:
    if '=' not in item:
      raise ConfigError(f"override {item!r} must look like 'section.key=value'")
    key, value = item.split('=', 1)
    where = f'override {item!r}'
    list_key = _list_prefix(key)
    if list_key:
      _set_list_entry(merged, key, list_key, value, where)
      continue
    if key not in set(_known_keys(Config())):
      raise _unknown_key_error(key, 'command line')
    section = _type_at(key)
    if dataclasses.is_dataclass(section):
      raise ConfigError(f"command line: '{key}' is a section; set one of its "
                        f'keys, e.g. {key}.{dataclasses.fields(section)[0].name}=...')
    merged = _merge(merged, OmegaConf.from_dotlist([f'{key}={value}']), where, key)
  cfg = OmegaConf.to_object(merged)
  validate(cfg)
  return cfg


def _value_of(layer: Any, key: str) -> Any:
  try:
    return OmegaConf.select(layer, key, throw_on_missing=False)
  except Exception:  # pragma: no cover - best effort for the message
    return '?'


def _expected_type(key: str) -> str:
  try:
    return _type_name(_type_at(key))
  except KeyError:  # pragma: no cover
    return 'value'


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
  return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# --------------------------------------------------------------- validation


def _fail(key: str, value: Any, valid: str) -> None:
  raise ConfigError(f'{key}={value!r} is invalid: {valid}')


def _check_name(key: str, name: str, valid: Sequence[str]) -> None:
  if name not in valid:
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ''
    _fail(key, name, f'one of {sorted(valid)}{hint}')


def layer_period(model_cfg: ModelConfig) -> int:
  """Layers in one repeat of the layer pattern (local/global x MoE every n-th)."""
  moe = model_cfg.moe
  attn_period = 1 if model_cfg.local_layers < 0 else model_cfg.local_layers + 1
  return math.lcm(attn_period, moe.moe_every if moe.num_experts else 1)


def _check_layers(m: ModelConfig) -> None:
  """The sublayer names and the layer pattern (what the decoder is built from)."""
  _check_name('model.attention', m.attention, ATTENTION_KINDS)
  _check_name('model.mlp', m.mlp, MLP_KINDS)
  if m.attention_block <= 0:
    _fail('model.attention_block', m.attention_block, 'must be a positive chunk size')
  if m.local_layers < -1:
    _fail('model.local_layers', m.local_layers, 'must be >= 0 (or -1: every layer slides)')
  if m.local_layers and m.window <= 0:
    _fail('model.window', m.window, f'model.local_layers={m.local_layers} needs a '
          'positive sliding window')
  if m.moe.num_experts:
    _check_moe(m.moe)
  _check_family_options(m)
  if m.attention == 'infini':
    _check_name('model.infini.update', m.infini.update, INFINI_UPDATES)
    if m.infini.segment_len <= 0:
      _fail('model.infini.segment_len', m.infini.segment_len, 'must be > 0')
  period = layer_period(m)
  if m.num_layers % period and m.moe.num_experts:
    _fail('model.num_layers', m.num_layers,
          f'must be a multiple of the layer pattern period {period} with MoE layers '
          '(a partial last period, the tail, is for dense models)')
  if m.num_layers < period and m.local_layers > 0:
    _fail('model.num_layers', m.num_layers,
          f'must be at least the layer pattern period {period} '
          f'(model.local_layers={m.local_layers} sliding layers, then a global one)')


def _check_family_options(m: ModelConfig) -> None:
  """The pretrained-family options (norm, activation, soft-caps, RoPE)."""
  _check_name('model.mlp_activation', m.mlp_activation, MLP_ACTIVATIONS)
  for key in ('attn_softcap', 'final_softcap', 'query_scale', 'local_rope_base'):
    if getattr(m, key) < 0:
      _fail(f'model.{key}', getattr(m, key), '>= 0 (0 = off / the default)')
  if m.attn_softcap and m.attention not in SOFTCAP_KERNELS:
    _fail('model.attn_softcap', m.attn_softcap,
          f"supported by model.attention in {SOFTCAP_KERNELS} (got {m.attention!r})")
  if m.attention == 'infini' and (m.query_scale or m.rope_scaling.kind != 'none'):
    _fail('model.attention', m.attention, "not 'infini' with model.query_scale or "
          'model.rope_scaling (Infini-attention uses the default scale and RoPE)')
  if m.moe.num_experts and m.mlp_activation != 'silu':
    _fail('model.mlp_activation', m.mlp_activation,
          "'silu' with MoE layers (experts are SwiGLU)")
  r = m.rope_scaling
  _check_name('model.rope_scaling.kind', r.kind, ROPE_SCALINGS)
  if r.kind != 'none' and r.factor <= 0:
    _fail('model.rope_scaling.factor', r.factor, 'must be > 0')
  if r.kind == 'llama3':
    if not 0 < r.low_freq_factor < r.high_freq_factor:
      _fail('model.rope_scaling.low_freq_factor', r.low_freq_factor,
            f'in (0, model.rope_scaling.high_freq_factor={r.high_freq_factor})')
    if r.original_max_len <= 0:
      _fail('model.rope_scaling.original_max_len', r.original_max_len, 'must be > 0')


def _check_moe(moe: MoEConfig) -> None:
  def bad(key, valid):
    _fail(f'model.moe.{key}', getattr(moe, key), valid)
  if moe.num_experts < 0:
    bad('num_experts', 'a number of experts >= 0 (0 = dense)')
  if not 1 <= moe.top_k <= moe.num_experts:
    bad('top_k', f'must be in [1, model.moe.num_experts={moe.num_experts}]')
  if moe.moe_every < 1:
    bad('moe_every', 'must be >= 1 (every n-th layer is MoE)')
  for key in ('expert_dim', 'shared_experts'):
    if getattr(moe, key) < 0:
      bad(key, 'must be >= 0')
  if moe.capacity_factor <= 0:
    bad('capacity_factor', 'must be > 0')
  if moe.path not in MOE_PATHS:
    bad('path', f'one of {MOE_PATHS}')
  if moe.dropless_buffer_factor != 0 and not moe.dropless_buffer_factor >= 1:
    bad('dropless_buffer_factor', '0 (worst-case buffer, nothing dropped) or >= 1 (that '
        'many times a balanced load; below 1 even a balanced load drops)')
  for key in ('router_z_loss', 'load_balance_loss'):
    if getattr(moe, key) < 0:
      bad(key, 'a loss coefficient >= 0')


def _check_distributed(mesh: MeshConfig) -> None:
  """The multi-host keys (jax.distributed.initialize's arguments)."""
  for key in ('heartbeat_timeout_s', 'initialization_timeout_s'):
    if getattr(mesh, key) <= 0:
      _fail(f'mesh.{key}', getattr(mesh, key), 'a positive number of seconds')
  if mesh.distributed and mesh.coordinator_address:
    if ':' not in mesh.coordinator_address:
      _fail('mesh.coordinator_address', mesh.coordinator_address,
            "'host:port' of process 0 (e.g. '10.0.0.1:1234')")
    if mesh.num_processes < 1:
      _fail('mesh.num_processes', mesh.num_processes,
            'the number of processes (>= 1) when mesh.coordinator_address is set')
    if not 0 <= mesh.process_id < mesh.num_processes:
      _fail('mesh.process_id', mesh.process_id,
            f'in [0, mesh.num_processes={mesh.num_processes}) when '
            'mesh.coordinator_address is set')


def validate(cfg: Config) -> None:
  """Cross-field checks of a config on its own. The checks that need the
  device count (mesh shape, splits over its axes) are
  `gemjax.parallel.mesh.validate_mesh`."""
  m = cfg.model
  e = cfg.eval
  if not e.guidance_scale > 0:
    _fail('eval.guidance_scale', e.guidance_scale, 'a positive number (1 = no guidance)')
  if e.image_temperature < 0:
    _fail('eval.image_temperature', e.image_temperature, '>= 0 (0 = greedy)')
  if e.image_top_k < 0:
    _fail('eval.image_top_k', e.image_top_k, '>= 0 (0 = all codes)')
  c = cfg.checkpoint
  if c.freeze_loaded_steps < 0:
    _fail('checkpoint.freeze_loaded_steps', c.freeze_loaded_steps, 'a number of steps >= 0')
  if (c.init_partial or c.freeze_loaded_steps) and not c.init_from:
    key = 'checkpoint.init_partial' if c.init_partial else 'checkpoint.freeze_loaded_steps'
    _fail(key, getattr(c, key.split('.')[1]), 'needs checkpoint.init_from (the model to '
          'fine-tune from)')
  if e.every < 0:
    _fail('eval.every', e.every, 'a number of steps >= 0 (0 = no evaluation during training)')
  if e.train_max_records < 0:
    _fail('eval.train_max_records', e.train_max_records, '>= 0 (0 = every record)')
  if e.every and e.task_batch_size <= 0:
    _fail('eval.task_batch_size', e.task_batch_size,
          f'must be a positive number of rows with eval.every={e.every}')
  for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads',
              'num_kv_heads', 'head_dim', 'mlp_dim'):
    if getattr(m, key) <= 0:
      _fail(f'model.{key}', getattr(m, key), 'must be a positive integer')
  if m.share_visual_embedder and not (m.image_patch_dim and
                                      m.image_patch_dim == m.video_patch_dim):
    _fail('model.share_visual_embedder', m.share_visual_embedder,
          f'needs model.image_patch_dim == model.video_patch_dim > 0 (got '
          f'{m.image_patch_dim} and {m.video_patch_dim})')
  if m.num_heads % m.num_kv_heads:
    _fail('model.num_kv_heads', m.num_kv_heads,
          f'must divide model.num_heads={m.num_heads} (grouped-query attention)')
  if m.head_dim % 2:
    _fail('model.head_dim', m.head_dim, 'must be even (rotary embeddings rotate pairs)')
  if m.loss_chunk < 0 or (m.loss_chunk and cfg.train.seq_len % m.loss_chunk):
    _fail('model.loss_chunk', m.loss_chunk,
          f'0 (off) or a number of tokens dividing train.seq_len={cfg.train.seq_len}')
  if cfg.mesh.context_layout not in CONTEXT_LAYOUTS:
    _fail('mesh.context_layout', cfg.mesh.context_layout, f'one of {CONTEXT_LAYOUTS}')
  _check_distributed(cfg.mesh)
  if len(m.mrope_sections) != 3 or min(m.mrope_sections) < 0 or sum(m.mrope_sections) == 0:
    _fail('model.mrope_sections', m.mrope_sections,
          'three non-negative weights for the (t, h, w) rotary sections')
  if m.remat not in REMAT_POLICIES:
    _fail('model.remat', m.remat, f'one of {REMAT_POLICIES}')
  if m.param_dtype not in DTYPES:
    _fail('model.param_dtype', m.param_dtype, f'one of {DTYPES}')
  if m.compute_dtype not in DTYPES + ('auto',):
    _fail('model.compute_dtype', m.compute_dtype, f"one of {DTYPES + ('auto',)}")
  _check_layers(m)
  t = cfg.train
  for key in ('steps', 'batch_size', 'seq_len', 'log_every'):
    if getattr(t, key) <= 0:
      _fail(f'train.{key}', getattr(t, key), 'must be a positive integer')
  p = list(t.profile_steps)
  if p and (len(p) != 2 or not 0 <= p[0] < p[1] <= t.steps):
    _fail('train.profile_steps', p, '[] (off) or [start, end], two step counts with '
          f'0 <= start < end <= train.steps={t.steps} (the trace runs from when '
          '`start` steps are done until `end` are)')
  o = cfg.optimizer
  if o.learning_rate <= 0:
    _fail('optimizer.learning_rate', o.learning_rate, 'must be > 0')
  if not 0 <= o.min_lr_ratio <= 1:
    _fail('optimizer.min_lr_ratio', o.min_lr_ratio, 'must be in [0, 1]')
  if o.warmup_steps < 0:
    _fail('optimizer.warmup_steps', o.warmup_steps, 'must be >= 0')
  c = cfg.checkpoint
  if c.every <= 0:
    _fail('checkpoint.every', c.every, 'must be a positive number of steps')
  if c.keep <= 0:
    _fail('checkpoint.keep', c.keep, 'must keep at least one checkpoint')
  _check_name('data.source', cfg.data.source, DATA_SOURCES)
  if m.attention == 'infini' and cfg.train.seq_len >= m.infini.segment_len and \
      cfg.train.seq_len % m.infini.segment_len:
    _fail('model.infini.segment_len', m.infini.segment_len,
          f'must divide train.seq_len={cfg.train.seq_len}')
  d = cfg.data
  if d.source == 'grain' and not d.datasets:
    _fail('data.datasets', d.datasets, "data.source='grain' needs at least one dataset")
  if d.bad_records not in ('skip', 'strict'):
    _fail('data.bad_records', d.bad_records, "'skip' or 'strict'")
  if not (isinstance(d.blas_threads, int) and d.blas_threads >= 0):
    _fail('data.blas_threads', d.blas_threads, "an integer >= 0 (0 = numpy's default)")
  if not isinstance(d.image_codes, str):
    _fail('data.image_codes', d.image_codes, "a directory of a saved ImageCodeTokenizer, "
          "or '' for none")
  for key in ('datasets', 'eval_datasets'):
    for i, ds in enumerate(getattr(d, key)):
      if not 0 <= ds.cond_dropout < 1:
        _fail(f'data.{key}[{i}].cond_dropout', ds.cond_dropout,
              'a probability in [0, 1) (0 = never drop the condition)')
      if not ds.loss_weight > 0:
        _fail(f'data.{key}[{i}].loss_weight', ds.loss_weight,
              'a number > 0 (1 = as is; training data only)')
      for aug in ('augment_image', 'augment_audio'):
        if not 0 <= getattr(ds, aug) <= 1:
          _fail(f'data.{key}[{i}].{aug}', getattr(ds, aug),
                'a probability in [0, 1] (0 = off; training data only)')
  if d.source == 'grain':
    if m.image_patch_dim and m.image_patch_dim != 3 * d.image_patch_size ** 2:
      _fail('model.image_patch_dim', m.image_patch_dim,
            f'must be 3 * data.image_patch_size**2 = {3 * d.image_patch_size ** 2}')
    if m.video_patch_dim and m.video_patch_dim != 3 * d.image_patch_size ** 2:
      _fail('model.video_patch_dim', m.video_patch_dim,
            f'must be 3 * data.image_patch_size**2 = {3 * d.image_patch_size ** 2}')
    if m.audio_patch_dim and m.audio_patch_dim != d.audio_patch_frames * d.audio_patch_mels:
      _fail('model.audio_patch_dim', m.audio_patch_dim,
            f'must be data.audio_patch_frames * data.audio_patch_mels = '
            f'{d.audio_patch_frames * d.audio_patch_mels}')
