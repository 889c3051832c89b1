"""Data sources by name (`data.source`): config -> process-local batch iterator.

A builder takes the run config, the split ('train' | 'eval'), this process's
index and the process count, and returns an iterator of process-local batches
in the batch contract with `get_state() / set_state()` (checkpointed with the
model). The Grain pipeline registers itself here the same way.
"""

from __future__ import annotations

import os
from typing import Callable

from gemjax import config
from gemjax.data import simple

SOURCES: dict[str, Callable] = {}


def register_source(name: str):
  """Adds a source builder; a name registered twice is an error, not an override."""
  def deco(fn):
    if name in SOURCES:
      raise ValueError(f'data source {name!r} is already registered ({SOURCES[name]!r})')
    SOURCES[name] = fn
    if name not in config.DATA_SOURCES:
      config.DATA_SOURCES.append(name)   # the config language learns the plug-in's name
    return fn
  return deco


@register_source('synthetic')
def _synthetic(cfg, split: str, process_index: int, process_count: int):
  t = cfg.train
  gen = simple.SyntheticMarkov(vocab=min(256, cfg.model.vocab_size), seed=t.seed)
  rows = simple.process_rows(t.batch_size, process_index, process_count)
  salt = 0 if split == 'train' else 1
  return simple.StepIterator(lambda step: gen.rows(step, rows, t.seq_len, salt))


@register_source('text_file')
def _text_file(cfg, split: str, process_index: int, process_count: int):
  t = cfg.train
  path = cfg.data.train_path if split == 'train' else (cfg.data.eval_path or cfg.data.train_path)
  src = simple.ByteTextFile(path, seed=t.seed)
  rows = simple.process_rows(t.batch_size, process_index, process_count)
  salt = 0 if split == 'train' else 1
  return simple.StepIterator(lambda step: src.rows(step, rows, t.seq_len, salt))


def make_iterator(cfg, split: str, process_index: int = 0, process_count: int = 1):
  return SOURCES[cfg.data.source](cfg, split, process_index, process_count)


def image_code_tokenizer(cfg):
  """The run's discrete image tokenizer (`data.image_codes`), or None if unset."""
  path = cfg.data.image_codes
  if not path:
    return None
  from gemjax.errors import CheckpointError, ConfigError
  from gemjax.tokenizers.image_codes import ImageCodeTokenizer
  try:
    return ImageCodeTokenizer.load(path)
  except (CheckpointError, OSError, ValueError) as e:
    raise ConfigError(f'data.image_codes={path!r}: cannot load an ImageCodeTokenizer '
                      f'there ({type(e).__name__}: {e})') from e


def text_tokenizer(cfg, image_codes=None):
  """The run's text tokenizer, its layout reserving the image codes of
  `data.image_codes`: the one vocabulary layout of the run (training, eval and
  inference all build it here). `image_codes`: an already loaded code
  tokenizer (default: load it from the config)."""
  from gemjax.errors import ConfigError
  from gemjax.tokenizers.text import load_text_tokenizer
  d = cfg.data
  codes = image_codes if image_codes is not None else image_code_tokenizer(cfg)
  num_codes = int(codes.num_codes) if codes is not None else 0
  text = load_text_tokenizer(d.tokenizer, num_codes)
  if text.layout.size > cfg.model.vocab_size:
    raise ConfigError(f'model.vocab_size={cfg.model.vocab_size} is smaller than the '
                      f'vocabulary of data.tokenizer={d.tokenizer!r} with '
                      f'{num_codes} image codes (data.image_codes={d.image_codes!r}): '
                      f'{text.layout.size}')
  return text


def limit_blas_threads(threads: int) -> None:
  """Caps numpy's BLAS thread pool for this whole process (`data.blas_threads`;
  0 leaves it alone). The data builders' matrix products (mel filterbanks,
  image codes) are small; with a pool per core, BLAS worker threads spin on
  the cores XLA is computing on, which cost nano's training step ~20% on 2
  cores (BENCHMARKS.md, "make run time")."""
  if threads > 0:
    import threadpoolctl
    threadpoolctl.threadpool_limits(limits=threads, user_api='blas')
    # Grain's worker processes (data.num_workers) start fresh interpreters:
    # their BLAS reads its thread count from the environment when it loads.
    for var in ('OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
      os.environ.setdefault(var, str(threads))


def sequence_builder(cfg):
  """The SequenceBuilder the run's data settings describe (with the image
  code tokenizer of `data.image_codes`, when set)."""
  from gemjax.data.sequence import SequenceBuilder
  from gemjax.tokenizers.audio import AudioTokenizer
  from gemjax.tokenizers.image import ImageTokenizer
  from gemjax.tokenizers.video import VideoTokenizer
  d = cfg.data
  limit_blas_threads(d.blas_threads)
  codes = image_code_tokenizer(cfg)
  text = text_tokenizer(cfg, codes)
  audio = AudioTokenizer(patch_frames=d.audio_patch_frames, patch_mels=d.audio_patch_mels)
  image = ImageTokenizer(patch_size=d.image_patch_size, max_tokens=d.image_max_tokens)
  video = VideoTokenizer(fps=d.video_fps, max_frames=d.video_max_frames, audio=audio,
                         image=ImageTokenizer(patch_size=d.image_patch_size,
                                              max_tokens=d.video_frame_tokens))
  weights = {'text': d.loss_weight_text, 'image_code': d.loss_weight_image_code}
  return SequenceBuilder(text, image=image, audio=audio, video=video, loss_weights=weights,
                         media_cache_mb=d.media_cache_mb, image_codes=codes)


def data_settings(cfg, split: str):
  """The pipeline settings of a split: the config's datasets as they are."""
  from gemjax import batch as batch_lib
  from gemjax.data import pipeline
  d = cfg.data
  specs = d.datasets if split == 'train' else (d.eval_datasets or d.datasets)
  return pipeline.DataSettings(datasets=tuple(specs),
                               patch_budgets=batch_lib.patch_budgets(d),
                               bad_records=d.bad_records, num_workers=d.num_workers)


@register_source('grain')
def _grain(cfg, split: str, process_index: int, process_count: int):
  from gemjax.data import pipeline
  builder = sequence_builder(cfg)
  t = cfg.train
  settings = data_settings(cfg, split)
  if split == 'train':
    return pipeline.make_train_iterator(settings, builder, seq_len=t.seq_len,
                                        batch_size=t.batch_size // process_count,
                                        process_index=process_index,
                                        process_count=process_count, seed=t.seed)
  return pipeline.make_eval_iterator(settings, builder, seq_len=t.seq_len,
                                     batch_size=t.batch_size // process_count,
                                     process_index=process_index, process_count=process_count,
                                     seed=t.seed)


@register_source('passkey')
def _passkey(cfg, split: str, process_index: int, process_count: int):
  from gemjax.data import passkey
  return passkey.passkey_source(cfg, split, process_index, process_count)
