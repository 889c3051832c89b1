"""The Grain pipeline: sources -> checkpointable iterator of packed batches.

    per dataset:  source[process_index::process_count]   (disjoint per process)
                  -> shuffle(seed, reshuffled every epoch) -> repeat
                  -> decode record [+ condition dropout, training only: cond_dropout]
                  -> SequenceBuilder.build (bad-record policy) [+ media
                     augmentation, training only: augment_image / augment_audio]
                  [x loss_weight on its loss weights, training only]
    mix datasets by weight (deterministic interleave, Grain IterDataset.mix)
    -> pack into rows [T] (multimodal-aware budgets, gemjax.data.packing)
    -> batch [B, ...] -> multiprocess prefetch (num_workers, 0 = in-process)
    -> PipelineIterator: strips the per-batch counters, keeps running stats,
       get_state()/set_state() for the Orbax checkpoint

Sharding happens on the source, before shuffling: every process owns a fixed
1/process_count of each dataset for the whole run, so processes never see the
same record, in any epoch. Everything is a pure function of (seed, process
index, process count, settings), so a run restored from `get_state()` sees
exactly the batches an uninterrupted run would (with the same `num_workers`:
Grain splits work per worker, so the worker count is part of the order, and a
state saved with another count is refused).

Bad records (a record that does not decode, or media the builder rejects with
BadInputError): `bad_records='skip'` (default) skips and counts them and logs
the source:index of the first few; `'strict'` raises BadInputError naming the
source and index. Examples with patches that cannot fit one row are dropped
and counted as `dropped`. See `PipelineIterator.stats`.

Imports grain, numpy, gemjax.batch, gemjax.config (DatasetConfig: the
datasets are the run config's own), gemjax.data.{augment, condition, packing,
records, sources}, gemjax.errors. The sequence builder is passed in (any object with
`build(record, source=...) -> example`), so this room does not depend on the
tokenizers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable, Mapping, Protocol

import grain
import numpy as np

from gemjax import batch as batch_lib
from gemjax.config import DatasetConfig
from gemjax.data import augment
from gemjax.data import condition
from gemjax.data import packing
from gemjax.data import records
from gemjax.data import sources
from gemjax.errors import BadInputError, ConfigError

log = logging.getLogger('gemjax.data')

BAD_RECORD_POLICIES = ('skip', 'strict')


class ExampleBuilder(Protocol):
  """What the pipeline needs of `gemjax.data.sequence.SequenceBuilder`."""

  def build(self, record: dict, source: str = ..., augment: Any = ...
            ) -> Mapping[str, np.ndarray]:
    """`augment` (a per-record `augment.RecordAugment`) is only passed when a
    dataset sets augment_image / augment_audio."""
    ...


def open_dataset(ds: DatasetConfig, *, seed: int = 0,
                 convert: Callable[[Mapping[str, Any]], dict] | None = None):
  """The random-access source of one dataset of the mixture.

  `ds` is the run config's `data.datasets[i]` (`gemjax.config.DatasetConfig`):
  path, kind, TFDS split / data_dir ('' = TFDS's default), and the settings
  of the composed kinds 'pairs' (`gemjax.data.pairs`) and 'image_video'
  (`gemjax.data.compose`), which `seed` composes;
  `convert` turns a TFDS example into a record (TFDS only; picklable).
  """
  if ds.kind == 'pairs':
    from gemjax.data.pairs import MatchPairsSource
    if not ds.pair_with:
      raise ConfigError(f"dataset {ds.path!r}: kind 'pairs' needs pair_with")
    return MatchPairsSource(sources.open_source('auto', ds.path),
                            sources.open_source('auto', ds.pair_with),
                            label_key=ds.pair_label, prompt=ds.pair_prompt,
                            size=ds.pair_size, seed=seed, task=ds.pair_task)
  if ds.kind == 'image_video':
    from gemjax.data.compose import ImageVideoSource
    if len(ds.compose_frames) != 2:
      raise ConfigError(f'dataset {ds.path!r}: compose_frames = {ds.compose_frames}; '
                        f'expected [min, max]')
    return ImageVideoSource(sources.open_source('auto', ds.path), label_key=ds.pair_label,
                            prompt=ds.pair_prompt, frames=tuple(ds.compose_frames),
                            fps=ds.compose_fps, size=ds.pair_size, seed=seed,
                            task=ds.pair_task)
  return sources.open_source(ds.kind, ds.path, split=ds.split,
                             data_dir=ds.data_dir or None, convert=convert)


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Everything the pipeline needs besides seq_len, batch size, process, seed.

  Attributes:
    datasets: the mixture (`gemjax.config.DatasetConfig`, as in the run
      config's `data.datasets`); weights are normalised.
    patch_budgets: per continuous modality, max patches in one row (and the
      P_m of the batch keys); a modality absent or 0 gets no batch keys.
    patch_dims: per continuous modality, the flattened patch size D_m
      (default: the builder's `patch_dims`).
    bad_records: 'skip' (count and log, default) or 'strict' (raise).
    num_workers: Grain worker processes (0 = decode in this process).
    worker_buffer: batches each worker prepares ahead.
    read_threads: threads per process reading + decoding records.
    pack_bins: rows packed at once (more = fuller rows, more memory).
    split_text: split text-only examples across rows to fill them.
    min_split: smallest piece a text example is split into.
    shuffle: shuffle each dataset (reshuffled every epoch).
    num_epochs: None = repeat forever (training); an int = that many passes
      (with several datasets the mixture stops when the first one runs out).
    converts: dataset index -> (TFDS example -> record dict), for TFDS
      datasets whose examples are not encoded gemjax records (picklable,
      e.g. `sources.ImageLabelToRecord()`); a function, so not in the config.
  """

  datasets: tuple[DatasetConfig, ...]
  patch_budgets: Mapping[str, int] = dataclasses.field(default_factory=dict)
  patch_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)
  bad_records: str = 'skip'
  num_workers: int = 0
  worker_buffer: int = 2
  read_threads: int = 2
  pack_bins: int = 8
  split_text: bool = True
  min_split: int = 32
  shuffle: bool = True
  num_epochs: int | None = None
  converts: Mapping[int, Callable[[Mapping[str, Any]], dict]] = dataclasses.field(
      default_factory=dict)

  def __post_init__(self):
    if not self.datasets:
      raise ConfigError('data: datasets is empty; give at least one DatasetConfig')
    for i, d in enumerate(self.datasets):
      if not d.weight > 0:
        raise ConfigError(f'data.datasets[{i}].weight = {d.weight}; must be > 0')
    for i in self.converts:
      if not 0 <= i < len(self.datasets):
        raise ConfigError(f'data: converts[{i}] names no dataset; valid: '
                          f'0..{len(self.datasets) - 1}')
    if self.bad_records not in BAD_RECORD_POLICIES:
      raise ConfigError(f'data.bad_records = {self.bad_records!r}; valid: '
                        f'{BAD_RECORD_POLICIES}')
    if self.num_workers < 0:
      raise ConfigError(f'data.num_workers = {self.num_workers}; must be >= 0')
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ConfigError(f'data.num_epochs = {self.num_epochs}; must be >= 1 or None')


class DecodeAndBuild:
  """Grain map: source item -> example, or a bad marker (or raise if strict).

  With `cond_dropout` p > 0 or augmentation (training), called as a
  map-with-index: element `index` of the dataset's shuffled, repeated stream
  loses its condition (`condition.drop_condition`) when
  `condition.drops_condition(p, seed, stream, index)`, and its media are
  augmented (`augment.RecordAugment`, each image / frame with probability
  `augment_image`, each audio clip with `augment_audio`) from
  `augment.augment_rng(seed, stream, index)`; `stream` = (dataset index,
  process index). The index counts across epochs, so each epoch draws afresh,
  and it is part of Grain's checkpointed position, so a resumed run drops and
  augments the same records in the same way.
  """

  def __init__(self, builder: ExampleBuilder, strict: bool, *, cond_dropout: float = 0.0,
               augment_image: float = 0.0, augment_audio: float = 0.0,
               loss_weight: float = 1.0, seed: int = 0, stream: tuple[int, ...] = ()):
    self.builder = builder
    self.loss_weight = float(loss_weight)
    self.strict = strict
    self.cond_dropout, self.seed, self.stream = cond_dropout, seed, tuple(stream)
    self.augment_image, self.augment_audio = augment_image, augment_audio

  @property
  def uses_index(self) -> bool:
    return self.cond_dropout > 0 or self.augment_image > 0 or self.augment_audio > 0

  def with_index(self, index: int, item: Mapping[str, Any]) -> dict[str, Any]:
    drop = condition.drops_condition(self.cond_dropout, self.seed, self.stream, index)
    aug = None
    if self.augment_image > 0 or self.augment_audio > 0:
      aug = augment.RecordAugment(augment.augment_rng(self.seed, self.stream, index),
                                  image_p=self.augment_image, audio_p=self.augment_audio)
    return self(item, drop_condition=drop, augment=aug)

  def __call__(self, item: Mapping[str, Any], drop_condition: bool = False,
               augment: Any = None) -> dict[str, Any]:
    where = item['where']
    try:
      if 'error' in item:
        raise BadInputError(item['error'][0], where, item['error'][1])
      record = item['record']
      if isinstance(record, (bytes, bytearray, memoryview)):
        record = records.decode_record(bytes(record), where)
      if drop_condition:
        record = condition.drop_condition(record)
      if augment is None:
        example = self.builder.build(record, source=where)
      else:
        example = self.builder.build(record, source=where, augment=augment)
    except BadInputError as e:
      if self.strict:
        raise
      return packing.bad_item(where, e)
    if self.loss_weight != 1.0:
      example = dict(example, loss_weights=example['loss_weights'] * np.float32(self.loss_weight))
    return packing.check_example(example, where)


def _dataset_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _process_slice(source, spec: DatasetConfig, process_index: int,
                   process_count: int) -> grain.MapDataset:
  if not 0 <= process_index < process_count:
    raise ConfigError(f'process_index {process_index} not in [0, {process_count})')
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ConfigError(f'dataset {spec.path!r} has {len(source)} records: too '
                      f'few for {process_count} processes (process '
                      f'{process_index} gets none)')
  return ds


def pack_spec(settings: DataSettings, builder: ExampleBuilder, seq_len: int
              ) -> packing.PackSpec:
  """Row shape; patch sizes default to the builder's `patch_dims`, the
  padding id to its vocabulary's pad."""
  dims = dict(settings.patch_dims) or dict(getattr(builder, 'patch_dims', {}))
  layout = getattr(builder, 'layout', None)
  return packing.PackSpec(seq_len, dict(settings.patch_budgets), dims,
                          pad_id=int(getattr(layout, 'pad', 0)))


def build_dataset(settings: DataSettings, builder: ExampleBuilder, *,
                  seq_len: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1, seed: int = 0, train: bool = True
                  ) -> grain.IterDataset:
  """The Grain IterDataset of packed batches (with `_stats`), before the
  PipelineIterator wrapper. `seed` drives the shuffles and the composition of
  'pairs' datasets. `train=False`: no shuffle, datasets one after the other
  (weights ignored), `num_epochs` passes (default 1), final batch kept."""
  spec = pack_spec(settings, builder, seq_len)
  if batch_size < 1:
    raise ConfigError(f'batch_size = {batch_size}; must be >= 1')
  strict = settings.bad_records == 'strict'
  threads = settings.read_threads
  read_options = grain.ReadOptions(num_threads=threads,
                                   prefetch_buffer_size=max(4, 8 * threads))
  parts = []
  for i, ds_spec in enumerate(settings.datasets):
    source = open_dataset(ds_spec, seed=seed, convert=settings.converts.get(i))
    ds = _process_slice(source, ds_spec, process_index, process_count)
    if train and settings.shuffle:
      ds = ds.shuffle(seed=_dataset_seed(seed, i))
    epochs = settings.num_epochs if (train or settings.num_epochs) else 1
    if epochs != 1:
      ds = ds.repeat(epochs)
    # Condition dropout and augmentation: training only, never in evaluation.
    decode = DecodeAndBuild(
        builder, strict, seed=seed, stream=(i, process_index),
        cond_dropout=ds_spec.cond_dropout if train else 0.0,
        augment_image=ds_spec.augment_image if train else 0.0,
        augment_audio=ds_spec.augment_audio if train else 0.0,
        loss_weight=ds_spec.loss_weight if train else 1.0)
    parts.append(ds.map_with_index(decode.with_index) if decode.uses_index
                 else ds.map(decode))
  if not train:
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    it_ds = mixed.to_iter_dataset(read_options)
  elif len(parts) == 1:
    it_ds = parts[0].to_iter_dataset(read_options)
  else:
    # Mix iterators, not MapDatasets: Grain gives each worker process a strided
    # slice of every to_iter_dataset below it, so each worker mixes all
    # datasets. Slicing one mixed MapDataset instead would alias with the
    # mixing period (2 workers, 2 equal datasets: each worker gets one).
    it_ds = grain.IterDataset.mix([p.to_iter_dataset(read_options) for p in parts],
                                  [d.weight for d in settings.datasets])
  it_ds = packing.PackIterDataset(it_ds, spec, num_bins=settings.pack_bins,
                                  split_text=settings.split_text,
                                  min_split=settings.min_split)
  it_ds = it_ds.batch(batch_size, drop_remainder=train,
                      batch_fn=packing.batch_rows)
  if settings.num_workers > 0:
    _absl_flags_ready()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=settings.num_workers,
        per_worker_buffer_size=settings.worker_buffer))
  return it_ds


def _absl_flags_ready():
  # Grain's worker processes read absl flags; a program that never ran
  # absl.app (pytest, a notebook, our train.py) has not parsed them.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _empty_stats() -> dict[str, Any]:
  return {'batches': 0, 'examples': 0, 'bad': 0, 'dropped': 0, 'tokens': 0,
          'capacity': 0, 'bad_where': []}


class PipelineIterator(grain.DatasetIterator):
  """Batches in the batch contract, with running stats and checkpoint state.

  `stats`: batches, examples (packed; a text example split over rows counts
  once), bad (records skipped), dropped (examples too big for a row), tokens
  (non-padding tokens), capacity (B*T summed), bad_where (first sources).
  `get_state()` is a JSON-able dict (Grain's `CheckpointSave` stores it);
  `set_state()` restores both the data position and the stats. The state
  records `num_workers` (the Grain worker processes of `inner`): Grain splits
  the data between workers, so a position is only valid for the same count,
  and `set_state()` refuses a state saved with another.
  """

  def __init__(self, inner: grain.DatasetIterator, *, spec: packing.PackSpec,
               batch_size: int, pad_final: bool, num_workers: int = 0):
    super().__init__(inner)
    self._num_workers = num_workers
    self._copy = num_workers > 0
    self._spec = spec
    self._batch_size = batch_size
    self._pad_final = pad_final
    self._stats = _empty_stats()

  @property
  def stats(self) -> dict[str, Any]:
    s = copy.deepcopy(self._stats)
    s['packing_efficiency'] = s['tokens'] / s['capacity'] if s['capacity'] else 0.0
    return s

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    counts = batch.pop(packing.STATS_KEY)
    if self._copy:
      # Batches from worker processes live in shared memory that Grain frees
      # when the array is collected; plain copies keep a batch held by the
      # caller (or alive at interpreter exit) from pinning or leaking it.
      batch = {k: np.array(v) for k, v in batch.items()}
    B = batch['tokens'].shape[0]
    if self._pad_final and B < self._batch_size:
      spec = self._spec
      pad = batch_lib.empty_batch(self._batch_size - B, spec.seq_len, spec.row_budgets,
                                  spec.patch_dims, pad_id=spec.pad_id)
      batch = {k: np.concatenate([batch[k], pad[k]]) for k in batch}
    s = self._stats
    s['batches'] += 1
    s['examples'] += counts['examples']
    s['dropped'] += counts['dropped']
    s['tokens'] += int(np.count_nonzero(batch['segment_ids']))
    s['capacity'] += int(batch['segment_ids'].size)
    if counts['bad']:
      before = s['bad']
      s['bad'] += counts['bad']
      for where in counts['bad_where']:
        if len(s['bad_where']) < packing.MAX_BAD_WHERE and where not in s['bad_where']:
          log.warning('skipped bad record %s', where)
          s['bad_where'].append(where)
      # After the first few, a line at every power of ten keeps logs short.
      if len(str(s['bad'])) > len(str(before)) and s['bad'] >= 10:
        log.warning('%d bad records skipped so far (first: %s)', s['bad'],
                    s['bad_where'][0] if s['bad_where'] else '?')
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'pipeline': self._parent.get_state(), 'num_workers': self._num_workers,
            'stats': copy.deepcopy(self._stats)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    saved = _saved_num_workers(state)
    if saved is not None and saved != self._num_workers:
      # Grain fails on some of these (KeyError) and silently resumes others
      # from the wrong place (1 -> 2 workers), so refuse them all here.
      raise ConfigError(
          f'the data iterator state was saved with data.num_workers={saved}, but '
          f'this run sets data.num_workers={self._num_workers}: Grain splits the '
          f'data between worker processes, so the saved position is only valid '
          f'for the same count. Resume with data.num_workers={saved}, or start a '
          f'new run directory with checkpoint.init_from=<this checkpoint> '
          f'(parameters only: the optimizer and the data order start fresh)')
    self._parent.set_state(state['pipeline'])
    self._stats = {**_empty_stats(), **copy.deepcopy(dict(state['stats']))}


def _saved_num_workers(state: Mapping[str, Any]) -> int | None:
  """The worker count a `PipelineIterator` state was saved with. States saved
  before the count was recorded: read off Grain's layout (mp_prefetch
  interleaves one iterator per worker; in-process, the packer's own state is
  on top); None if the layout is not recognised."""
  if 'num_workers' in state:
    return int(state['num_workers'])
  inner = state['pipeline']
  if 'iterators_in_use_states' in inner:
    return len(inner['iterators_in_use_states'])
  return 0 if 'window' in inner else None


def make_train_iterator(settings: DataSettings, builder: ExampleBuilder, *,
                        seq_len: int, batch_size: int, process_index: int = 0,
                        process_count: int = 1, seed: int = 0) -> PipelineIterator:
  """An endless (unless num_epochs) iterator of process-local batches
  [batch_size, seq_len] in the batch contract, shuffled, mixed, packed."""
  ds = build_dataset(settings, builder, seq_len=seq_len, batch_size=batch_size,
                     process_index=process_index, process_count=process_count,
                     seed=seed, train=True)
  return PipelineIterator(iter(ds), spec=pack_spec(settings, builder, seq_len),
                          batch_size=batch_size, pad_final=False,
                          num_workers=settings.num_workers)


def make_eval_iterator(settings: DataSettings, builder: ExampleBuilder, *,
                       seq_len: int, batch_size: int, process_index: int = 0,
                       process_count: int = 1, seed: int = 0) -> PipelineIterator:
  """One ordered pass over every dataset (no shuffle, no mixing); the last
  batch is padded with empty rows (segment_ids 0, loss_weights 0). `seed`
  only composes 'pairs' datasets."""
  ds = build_dataset(settings, builder, seq_len=seq_len, batch_size=batch_size,
                     process_index=process_index, process_count=process_count,
                     seed=seed, train=False)
  return PipelineIterator(iter(ds), spec=pack_spec(settings, builder, seq_len),
                          batch_size=batch_size, pad_final=True,
                          num_workers=settings.num_workers)


def check_batch(batch: Mapping[str, np.ndarray], settings: DataSettings, *,
                seq_len: int, batch_size: int) -> None:
  """validate_batch plus the static shapes this pipeline promises."""
  batch_lib.validate_batch(batch, where='pipeline batch')
  if batch['tokens'].shape != (batch_size, seq_len):
    raise ValueError(f'batch tokens {batch["tokens"].shape} != {(batch_size, seq_len)}')
  for m, p in settings.patch_budgets.items():
    if p > 0:
      pk, _ = batch_lib.patch_keys(m)
      want = (batch_size, p, settings.patch_dims.get(m, batch[pk].shape[-1]))
      if batch[pk].shape != want:
        raise ValueError(f'{pk} {batch[pk].shape} != {want}')
