"""Packing: many variable-length examples -> fixed-length rows [T], checkpointably.

This room turns the unbatched examples of the sequence builder into rows of
the batch contract (`gemjax.batch`) and stacks rows into batches. An
example is::

  tokens[L] int32, modality[L] int8, positions[L, 3] int32, block_ids[L] int32,
  targets[L] int32, loss_weights[L] float32,
  {m}_patches[P_m, D_m] float32, {m}_slots[P_m] int32   (m = image|audio|video)

Packing rules (multimodal-aware first fit):
  - a row holds T tokens and, per continuous modality m, at most `budget[m]`
    patches; an example goes into the first open row where its tokens AND
    every one of its patch counts fit, otherwise a new row is opened;
  - every example keeps its own segment id (1, 2, ... in the row; 0 = padding),
    its positions unchanged, its block ids renumbered to be unique in the row,
    its slots shifted by the row offset it lands at (-1 = padding slot);
  - targets / loss_weights are carried as built (the builder gives the last
    token of a document weight 0), so no row ever predicts across documents;
  - text-only examples (no patches, no blocks) may be split across rows to
    fill them (`split_text`, pieces of at least `min_split` tokens), the usual
    concat-then-split of LM pre-training; an example with patches is never
    split: if it is longer than T or needs more patches than a row's budget it
    is dropped and counted.

Checkpointing (the scheme of Grain's own packers): rows are packed in windows
of at most `num_bins` open rows (plus up to 2 * num_bins rows that text chunks
filled completely). When an example does not fit any open row of a full
window, the window's rows are emitted in the order they were opened. The
iterator state is the parent state where the window started, how many tokens
of that window's first example an earlier window already took, and how many
of the window's rows were emitted; restoring re-packs that window
deterministically and skips the emitted rows.

Items that the decode step marked bad (`{'_bad': where, ...}`) are counted,
never packed; the counts ride on the first row of the window under `_stats`
and `batch_rows` sums them per batch (`gemjax.data.pipeline` strips them off).

Imports numpy, grain, gemjax.batch, gemjax.errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from gemjax import batch as batch_lib
from gemjax.errors import BadInputError

EXAMPLE_KEYS = ('tokens', 'modality', 'positions', 'block_ids', 'targets',
                'loss_weights')
# Per-token arrays a text piece is sliced along (all of EXAMPLE_KEYS).
STATS_KEY = '_stats'
MAX_BAD_WHERE = 8  # how many bad-record sources a row / the iterator keeps


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """Shape of a packed row: T tokens, per-modality patch budget and size."""

  seq_len: int
  patch_budgets: Mapping[str, int] = dataclasses.field(default_factory=dict)
  patch_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)
  pad_id: int = 0  # tokens / targets of padding (segment id 0, weight 0)

  def __post_init__(self):
    if self.seq_len < 2:
      raise ValueError(f'seq_len must be >= 2, got {self.seq_len}')
    for m, p in self.patch_budgets.items():
      if m not in batch_lib.CONTINUOUS_MODALITIES:
        raise ValueError(f'patch_budgets has unknown modality {m!r}; valid: '
                         f'{batch_lib.CONTINUOUS_MODALITIES}')
      if p > 0 and self.patch_dims.get(m, 0) <= 0:
        raise ValueError(f'patch_budgets[{m!r}] = {p} needs patch_dims[{m!r}] > 0')

  @property
  def modalities(self) -> tuple[str, ...]:
    """Continuous modalities that get patch keys in every row (budget > 0)."""
    return tuple(m for m in batch_lib.CONTINUOUS_MODALITIES
                 if self.patch_budgets.get(m, 0) > 0)

  @property
  def row_budgets(self) -> dict[str, int]:
    """modality -> P_m for the modalities every row carries."""
    return {m: self.patch_budgets[m] for m in self.modalities}


def example_length(example: Mapping[str, np.ndarray]) -> int:
  return int(example['tokens'].shape[0])


def example_patch_counts(example: Mapping[str, np.ndarray]) -> dict[str, int]:
  counts = {}
  for m in batch_lib.CONTINUOUS_MODALITIES:
    pk, _ = batch_lib.patch_keys(m)
    if pk in example and example[pk].shape[0]:
      counts[m] = int(example[pk].shape[0])
  return counts


def is_splittable(example: Mapping[str, np.ndarray]) -> bool:
  """Text-like: no continuous patches, no bidirectional blocks, no image
  codes (an image is generated whole, after its begin marker)."""
  return (not example_patch_counts(example) and not np.any(example['block_ids'])
          and not np.any(example['modality'] == batch_lib.IMAGE_CODE))


def check_example(example: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
  """Casts an example to the contract dtypes; raises ValueError (a builder bug,
  not bad input) naming the key when shapes disagree."""
  out = {}
  for key in EXAMPLE_KEYS:
    if key not in example:
      raise ValueError(f'{where}: the sequence builder returned no {key!r}')
    out[key] = np.asarray(example[key], batch_lib.KEYS[key].dtype)
  L = out['tokens'].shape[0]
  for key in EXAMPLE_KEYS:
    want = (L, 3) if key == 'positions' else (L,)
    if out[key].shape != want:
      raise ValueError(f'{where}: example {key} has shape {out[key].shape}, '
                       f'expected {want}')
  for m in batch_lib.CONTINUOUS_MODALITIES:
    pk, sk = batch_lib.patch_keys(m)
    if pk in example:
      patches = np.asarray(example[pk], batch_lib.KEYS[pk].dtype)
      slots = np.asarray(example[sk], batch_lib.KEYS[sk].dtype)
      if patches.ndim != 2 or slots.shape != patches.shape[:1]:
        raise ValueError(f'{where}: {pk} {patches.shape} / {sk} {slots.shape} '
                         'do not match ([P, D] and [P])')
      if np.any(slots >= L):
        raise ValueError(f'{where}: {sk} points past the {L} tokens')
      out[pk], out[sk] = patches, slots
  return out


def bad_item(where: str, error: BadInputError) -> dict[str, Any]:
  """The marker the decode step passes on instead of a bad record."""
  return {'_bad': where, '_reason': f'{error.modality}: {error.reason}'}


def _is_bad(item: Mapping[str, Any]) -> bool:
  return '_bad' in item


class _Row:
  """An open row: which (example, start, stop) pieces it holds."""

  __slots__ = ('order', 'pieces', 'used', 'patches')

  def __init__(self, order: int):
    self.order = order  # rows leave a window in the order they were opened
    self.pieces: list[tuple[dict, int, int]] = []  # (example, start, stop)
    self.used = 0
    self.patches: dict[str, int] = {}

  def fits(self, spec: PackSpec, length: int, counts: Mapping[str, int]) -> bool:
    if self.used + length > spec.seq_len:
      return False
    return all(self.patches.get(m, 0) + c <= spec.patch_budgets.get(m, 0)
               for m, c in counts.items())

  def add(self, example: dict, start: int, stop: int, counts: Mapping[str, int]):
    self.pieces.append((example, start, stop))
    self.used += stop - start
    for m, c in counts.items():
      self.patches[m] = self.patches.get(m, 0) + c


def empty_row(spec: PackSpec) -> dict[str, np.ndarray]:
  """An all-padding row of this shape (`gemjax.batch.empty_row`)."""
  return batch_lib.empty_row(spec.seq_len, spec.row_budgets, spec.patch_dims,
                             pad_id=spec.pad_id)


def _materialize(spec: PackSpec, open_row: _Row) -> dict[str, np.ndarray]:
  row = empty_row(spec)
  offset, block_offset = 0, 0
  patch_offsets = {m: 0 for m in spec.modalities}
  for seg, (ex, start, stop) in enumerate(open_row.pieces, 1):
    n = stop - start
    sl = slice(offset, offset + n)
    for key in EXAMPLE_KEYS:
      row[key][sl] = ex[key][start:stop]
    row['segment_ids'][sl] = seg
    blocks = ex['block_ids'][start:stop]
    if blocks.size and blocks.max() > 0:
      row['block_ids'][sl] = np.where(blocks > 0, blocks + block_offset, 0)
      block_offset += int(blocks.max())
    for m in spec.modalities:
      pk, sk = batch_lib.patch_keys(m)
      if pk not in ex or not ex[pk].shape[0]:
        continue
      p = ex[pk].shape[0]
      psl = slice(patch_offsets[m], patch_offsets[m] + p)
      row[pk][psl] = ex[pk]
      row[sk][psl] = np.where(ex[sk] >= 0, ex[sk] + offset, -1)
      patch_offsets[m] += p
    offset += n
  return row


def _empty_stats() -> dict[str, Any]:
  return {'examples': 0, 'bad': 0, 'dropped': 0, 'bad_where': []}


class Packer:
  """The packing state machine of one window, independent of Grain.

  Feed items with `add(item, skip)`: it returns None when it packed the item
  (from token `skip` on), else the token offset where the window filled up;
  then `flush()` the window's rows and add the item again from that offset.
  Pure numpy, so tests can drive it without Grain.
  """

  def __init__(self, spec: PackSpec, *, num_bins: int = 8, split_text: bool = True,
               min_split: int = 32, max_ready: int | None = None):
    self.spec = spec
    self.num_bins = num_bins
    self.split_text = split_text
    self.min_split = max(1, min_split)
    self.max_ready = max_ready if max_ready is not None else 2 * num_bins
    self.reset()

  def _new_row(self) -> _Row:
    self._opened += 1
    return _Row(self._opened)

  def reset(self):
    self._opened = 0
    self.bins: list[_Row] = []
    self.ready: list[_Row] = []  # rows already full (text chunks of length T)
    self.stats = _empty_stats()

  def _first_fit(self, length: int, counts: Mapping[str, int]) -> _Row | None:
    for row in self.bins:
      if row.fits(self.spec, length, counts):
        return row
    return None

  def add(self, item: Mapping[str, Any], skip: int = 0) -> int | None:
    """Packs item[skip:]. Returns None when all of it is packed, else the token
    offset from which the rest must start a new window (after `flush`)."""
    if _is_bad(item):
      self.stats['bad'] += 1
      if len(self.stats['bad_where']) < MAX_BAD_WHERE:
        self.stats['bad_where'].append(f"{item['_bad']} ({item['_reason']})")
      return None
    T = self.spec.seq_len
    L = example_length(item)
    counts = example_patch_counts(item)
    if L == 0:
      return None
    for m in counts:
      d = item[f'{m}_patches'].shape[1]
      if m in self.spec.modalities and d != self.spec.patch_dims[m]:
        raise ValueError(f'{m} patches of size {d} but the pipeline was set up '
                         f'with patch_dims[{m!r}] = {self.spec.patch_dims[m]}; '
                         "use the sequence builder's patch_dims")
    if not (self.split_text and is_splittable(item)):
      too_many = any(c > self.spec.patch_budgets.get(m, 0) for m, c in counts.items())
      if L > T or too_many:
        self.stats['dropped'] += 1
        return None
      row = self._first_fit(L, counts)
      if row is None:
        if len(self.bins) >= self.num_bins:
          return 0
        row = self._new_row()
        self.bins.append(row)
      row.add(item, 0, L, counts)
      self.stats['examples'] += 1
      return None
    # Text-like: fill rows, splitting where a piece of >= min_split fits.
    pos = skip
    while pos < L:
      first = pos == 0
      remaining = L - pos
      row = self._first_fit(remaining, {})
      if row is not None:
        row.add(item, pos, L, {})
        pos = L
      else:
        roomiest = max(self.bins, key=lambda r: T - r.used, default=None)
        free = T - roomiest.used if roomiest is not None else 0
        if free >= self.min_split:
          roomiest.add(item, pos, pos + free, {})
          pos += free
        elif remaining >= T:
          if len(self.ready) >= self.max_ready:
            return pos
          full = self._new_row()
          full.add(item, pos, pos + T, {})
          self.ready.append(full)
          pos += T
        elif len(self.bins) < self.num_bins:
          row = self._new_row()
          row.add(item, pos, L, {})
          self.bins.append(row)
          pos = L
        else:
          return pos
      if first:
        self.stats['examples'] += 1
    return None

  def flush(self) -> list[dict[str, Any]]:
    """The window's rows in the order they were opened; the window's counts
    ride on the first row (or on a padding row if none)."""
    rows = [_materialize(self.spec, r)
            for r in sorted(self.ready + self.bins, key=lambda r: r.order)]
    stats = self.stats
    self.reset()
    if not rows and stats == _empty_stats():
      return []
    if not rows:  # only bad records in this window: a padding row carries them
      rows = [empty_row(self.spec)]
    for i, row in enumerate(rows):
      row[STATS_KEY] = stats if i == 0 else _empty_stats()
    return rows


def pack_examples(items: Iterable[Mapping[str, Any]], spec: PackSpec,
                  **packer_kwargs) -> list[dict[str, Any]]:
  """Packs a finite list of examples (and bad markers) into rows. For tests
  and offline use; the pipeline uses `PackIterDataset`, which emits the same
  rows."""
  packer = Packer(spec, **packer_kwargs)
  rows = []
  for item in items:
    skip = 0
    while (skip := packer.add(item, skip)) is not None:
      rows.extend(packer.flush())
  rows.extend(packer.flush())
  return rows


class PackIterDataset(grain.IterDataset):
  """Grain transformation: examples (+ bad markers) -> packed rows [T]."""

  def __init__(self, parent: grain.IterDataset, spec: PackSpec, *,
               num_bins: int = 8, split_text: bool = True, min_split: int = 32,
               max_consecutive_bad: int = 10_000):
    super().__init__(parent)
    self._spec = spec
    self._packer_kwargs = dict(num_bins=num_bins, split_text=split_text,
                               min_split=min_split)
    self._max_consecutive_bad = max_consecutive_bad

  def __iter__(self) -> '_PackIterator':
    return _PackIterator(self._parent.__iter__(), self._spec, self._packer_kwargs,
                         self._max_consecutive_bad)

  def __str__(self):
    return f'PackIterDataset(seq_len={self._spec.seq_len}, budgets={dict(self._spec.patch_budgets)})'


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, spec: PackSpec, packer_kwargs, max_consecutive_bad):
    super().__init__(parent)
    self._packer = Packer(spec, **packer_kwargs)
    self._max_consecutive_bad = max_consecutive_bad
    self._start(self._parent.get_state(), 0, 0)

  def _start(self, window_state, window_skip: int, next_row: int):
    # The window whose rows are being emitted starts at (window_state, skip).
    self._window_state, self._window_skip = window_state, window_skip
    self._pending = None  # (item, skip) read by the previous window, not packed
    self._rows: list[dict] | None = None  # None: this window is not packed yet
    self._next_row = next_row
    self._following = None  # (state, skip) where the window after this starts
    self._exhausted = False

  def _pack_window(self):
    """Packs the current window into self._rows, reading from the parent."""
    packer = self._packer
    packer.reset()
    consecutive_bad = 0
    if self._pending is not None:
      item, skip = self._pending
      self._pending = None
      state_before = self._window_state
    else:
      item, skip, state_before = None, self._window_skip, self._window_state
    while True:
      if item is None:
        state_before = self._parent.get_state()
        try:
          item = next(self._parent)
        except StopIteration:
          self._exhausted = True
          self._rows = packer.flush()
          return
      seen = packer.stats['bad'] + packer.stats['dropped']
      rest = packer.add(item, skip)
      if rest is not None:
        self._rows = packer.flush()
        self._following = (state_before, rest)
        self._pending = (item, rest)
        return
      if packer.stats['bad'] + packer.stats['dropped'] > seen:
        consecutive_bad += 1
        if consecutive_bad >= self._max_consecutive_bad:
          raise BadInputError(
              'record', str(item.get('_bad', 'the pipeline')),
              f'the last {consecutive_bad} records were all bad or too long '
              f"to pack; the first ones: {packer.stats['bad_where'][:3]}")
      else:
        consecutive_bad = 0
      item, skip = None, 0

  def __next__(self):
    while True:
      if self._rows is None:
        self._pack_window()
      if self._next_row < len(self._rows):
        row = self._rows[self._next_row]
        self._next_row += 1
        return row
      if self._exhausted:
        raise StopIteration
      pending = self._pending
      self._window_state, self._window_skip = self._following
      self._rows, self._next_row, self._following = None, 0, None
      self._pending = pending

  def get_state(self) -> dict[str, Any]:
    return {'window': self._window_state, 'skip': self._window_skip,
            'next_row': self._next_row}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state['window'])
    self._start(state['window'], int(state['skip']), int(state['next_row']))


def batch_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Stacks rows into a batch [B, ...]; sums their `_stats`."""
  keys = [k for k in rows[0] if k != STATS_KEY]
  out: dict[str, Any] = {k: np.stack([r[k] for r in rows]) for k in keys}
  stats = _empty_stats()
  for r in rows:
    s = r.get(STATS_KEY)
    if s:
      stats['examples'] += s['examples']
      stats['bad'] += s['bad']
      stats['dropped'] += s['dropped']
      room = MAX_BAD_WHERE - len(stats['bad_where'])
      stats['bad_where'].extend(s['bad_where'][:room])
  out[STATS_KEY] = stats
  return out
