"""Stateless text-only batch sources: synthetic Markov text and a byte-level file.

Both produce process-local batches in the batch contract (text keys only) and
are pure functions of (seed, step, global row), so a resumed run sees exactly
the batches an uninterrupted run would, and two processes never draw the same
rows. Their iterator state is just the next step, saved as JSON bytes in the
form Grain's Orbax checkpoint handler expects.

Imports numpy and `gemjax.batch` only.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gemjax.batch import text_batch
from gemjax.errors import ConfigError


class StepIterator:
  """Iterator over `make(step) -> batch` with a checkpointable step counter."""

  def __init__(self, make, start_step: int = 0):
    self._make = make
    self.step = start_step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._make(self.step)
    self.step += 1
    return batch

  # Grain's CheckpointHandler calls these for non-Grain iterators.
  def get_state(self) -> bytes:
    return json.dumps({'step': self.step}).encode()

  def set_state(self, state: bytes) -> None:
    self.step = int(json.loads(state)['step'])

  def start_prefetch(self) -> None:
    pass


def _row_rng(seed: int, step: int, row: int, salt: int) -> np.random.Generator:
  return np.random.default_rng([seed, salt, step, row])


class SyntheticMarkov:
  """Sequences from a fixed sparse Markov chain over `vocab` text ids.

  Every token has `branching` equally likely successors, so a model that
  learns the chain reaches a loss of ln(branching): a learnable target with a
  known floor. Rows pack 1-3 documents with segment ids, exercising packing.
  """

  def __init__(self, *, vocab: int = 256, branching: int = 4, seed: int = 0,
               table_seed: int = 1234):
    self.vocab, self.branching, self.seed = vocab, branching, seed
    table_rng = np.random.default_rng(table_seed)
    self.successors = table_rng.integers(0, vocab, size=(vocab, branching))

  def rows(self, step: int, row_ids: range, seq_len: int, salt: int):
    B = len(row_ids)
    tokens = np.zeros((B, seq_len), np.int32)
    segs = np.zeros((B, seq_len), np.int32)
    for b, row in enumerate(row_ids):
      rng = _row_rng(self.seed, step, row, salt)
      n_docs = int(rng.integers(1, 4)) if seq_len >= 32 else 1
      cuts = np.sort(rng.choice(np.arange(8, seq_len - 8), size=n_docs - 1, replace=False)) \
          if n_docs > 1 else np.array([], int)
      bounds = [0, *cuts.tolist(), seq_len - int(rng.integers(0, min(8, seq_len // 4)))]
      for d in range(n_docs):
        lo, hi = bounds[d], bounds[d + 1]
        tok = int(rng.integers(0, self.vocab))
        choice = rng.integers(0, self.branching, size=hi - lo)
        for i in range(lo, hi):
          tokens[b, i] = tok
          tok = int(self.successors[tok, choice[i - lo]])
        segs[b, lo:hi] = d + 1
    return text_batch(tokens, segs)


class ByteTextFile:
  """Random windows of a UTF-8 file as byte tokens (ids 0-255)."""

  def __init__(self, path: str, *, seed: int = 0):
    if not path:
      raise ConfigError("data.source='text_file' needs data.train_path (and "
                        'data.eval_path for evaluation)')
    if not os.path.isfile(path):
      raise ConfigError(f'text file {path!r} does not exist')
    self.data = np.frombuffer(open(path, 'rb').read(), np.uint8)
    self.path, self.seed = path, seed

  def rows(self, step: int, row_ids: range, seq_len: int, salt: int):
    n = len(self.data)
    if n < seq_len + 1:
      raise ConfigError(f'text file {self.path!r} has {n} bytes, fewer than '
                        f'train.seq_len+1={seq_len + 1}')
    tokens = np.zeros((len(row_ids), seq_len), np.int32)
    for b, row in enumerate(row_ids):
      start = int(_row_rng(self.seed, step, row, salt).integers(0, n - seq_len))
      tokens[b] = self.data[start:start + seq_len]
    return text_batch(tokens)


def process_rows(global_batch: int, process_index: int, process_count: int) -> range:
  if global_batch % process_count:
    raise ConfigError(f'train.batch_size={global_batch} must be divisible by the '
                      f'number of processes {process_count}')
  per = global_batch // process_count
  return range(process_index * per, (process_index + 1) * per)
