"""Passkey retrieval (needle in a haystack) batches, in the batch contract.

Mohtashami & Jaggi 2023 (Landmark Attention): a numeric pass key is hidden at
a chosen depth inside repetitive filler text, and the row ends with a
question whose answer is the key:

    <filler ...> The pass key is 71432. Remember it. 71432 is the pass key.
    <filler ...> What is the pass key? The pass key is 71432

Tokens are UTF-8 bytes (`ByteTokenizer`, ids 0-255), text only, one document
per row; a row shorter than `seq_len` is padded with segment id 0. The loss
weight is 1 only on the positions that predict the answer digits, so the
loss (and `gemjax.eval.passkey`'s exact match) measures retrieval alone.

Batches are a pure function of (seed, step, row), like the other simple
sources, so a resumed run sees the same data. Imports numpy and gemjax.data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gemjax.batch import text_batch
from gemjax.data.simple import StepIterator, process_rows

FILLER = ('The grass is green. The sky is blue. The sun is yellow. '
          'Here we go. There and back again. ')
QUESTION = 'What is the pass key? The pass key is '


def needle(key: str) -> str:
  return f'The pass key is {key}. Remember it. {key} is the pass key. '


def min_length(digits: int = 5) -> int:
  """The shortest row that holds the needle, the question and the answer."""
  return len(needle('0' * digits)) + len(QUESTION) + digits


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  text: str
  key: str
  answer_start: int     # index of the first answer byte in the row
  needle_start: int     # index of the first byte of the needle sentence


def make_example(length: int, depth: float, key: int | str, *, digits: int = 5) -> PasskeyExample:
  """A passkey text of exactly `length` bytes with the needle at `depth` in [0, 1].

  Depth is the fraction of the filler placed before the needle, snapped back
  to a sentence start so the haystack stays natural text.
  """
  key = str(key).zfill(digits)
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f'passkey depth must be in [0, 1], got {depth}')
  fixed = len(needle(key)) + len(QUESTION) + len(key)
  budget = length - fixed
  if budget < 0:
    raise ValueError(f'passkey length {length} is too short: needs >= {fixed} bytes')
  filler = (FILLER * (budget // len(FILLER) + 2))[:budget]
  cut = int(round(depth * budget))
  if 0 < cut < budget:
    # Snap to the start of a sentence at or before the cut.
    snap = filler.rfind('. ', 0, cut + 1)
    cut = snap + 2 if snap >= 0 else 0
  before, after = filler[:cut], filler[cut:]
  # Keep the row exactly `length` bytes: `after` is the rest of the budget.
  text = before + needle(key) + after + QUESTION + key
  assert len(text) == length, (len(text), length)
  return PasskeyExample(text, key, len(text) - len(key), len(before))


def examples_to_batch(examples: list[PasskeyExample], seq_len: int) -> dict[str, np.ndarray]:
  """Byte rows (padded to seq_len, segment 0) with loss only on the answer."""
  B = len(examples)
  tokens = np.zeros((B, seq_len), np.int32)
  segs = np.zeros((B, seq_len), np.int32)
  answer = np.zeros((B, seq_len), np.float32)
  for b, ex in enumerate(examples):
    data = np.frombuffer(ex.text.encode('utf-8'), np.uint8)
    if len(data) > seq_len:
      raise ValueError(f'passkey example of {len(data)} bytes exceeds seq_len={seq_len}')
    tokens[b, :len(data)] = data
    segs[b, :len(data)] = 1
    # Position i predicts token i + 1: weights on the positions before each digit.
    answer[b, ex.answer_start - 1:ex.answer_start - 1 + len(ex.key)] = 1.0
  return text_batch(tokens, segs, loss_mask_BxT=answer)


def passkey_batch(rng: np.random.Generator, batch_size: int, seq_len: int, *,
                  lengths: tuple[int, int] | None = None, depth: float | None = None,
                  digits: int = 5) -> dict[str, np.ndarray]:
  """One batch of random keys at random (or fixed) depths and lengths.

  `lengths=(lo, hi)`: each row's text length is uniform in [lo, hi] (default:
  exactly seq_len); `depth=None`: uniform in [0, 1].
  """
  lo, hi = lengths or (seq_len, seq_len)
  lo = max(lo, min_length(digits))
  examples = []
  for _ in range(batch_size):
    n = int(rng.integers(lo, hi + 1))
    d = float(rng.uniform()) if depth is None else depth
    key = int(rng.integers(10 ** (digits - 1), 10 ** digits))
    examples.append(make_example(n, d, key, digits=digits))
  return examples_to_batch(examples, seq_len)


def passkey_batches(batch_size: int, seq_len: int, *, seed: int = 0,
                    lengths: tuple[int, int] | None = None, digits: int = 5,
                    start_step: int = 0, rows: range | None = None,
                    salt: int = 0) -> StepIterator:
  """Endless, checkpointable iterator of passkey training batches.

  Row r of step s depends only on (seed, salt, s, r); `rows` selects this
  process's rows of the global batch (default: all of them).
  """
  rows = range(batch_size) if rows is None else rows

  def make(step: int) -> dict[str, np.ndarray]:
    parts = [passkey_batch(np.random.default_rng([seed, salt, step, r]), 1, seq_len,
                           lengths=lengths, digits=digits) for r in rows]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  return StepIterator(make, start_step)


def passkey_source(cfg, split: str, process_index: int, process_count: int) -> StepIterator:
  """`data.source='passkey'` builder (register with `gemjax.data.registry`).

  Train rows have lengths uniform in [seq_len / 4, seq_len] so every depth is
  seen at every scale; eval rows are exactly seq_len long.
  """
  t = cfg.train
  rows = process_rows(t.batch_size, process_index, process_count)
  lengths = (max(min_length(), t.seq_len // 4), t.seq_len) if split == 'train' else None
  return passkey_batches(t.batch_size, t.seq_len, seed=t.seed, lengths=lengths, rows=rows,
                         salt=0 if split == 'train' else 1)
