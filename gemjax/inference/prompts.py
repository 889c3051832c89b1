"""Prompts: records in the sequence-builder format -> a prompt batch, and back to text.

A prompt is a record like any training record (gemjax/data/sequence.py):

    {'segments': [{'kind': 'image', 'data': '/path/cat.png'},
                  {'kind': 'text', 'text': 'What digit is this?'}]}

built with bos and *without* eos (the model continues it). `data` may be
bytes, an array, or a file path (read here, so a missing file is a clear
error naming the prompt). Rows are left-aligned and padded on the right to a
common length: `pad_multiple` times a power of two (16, 32, 64, ...), and
each modality's patches likewise with `patch_multiple`, so prompts of many
lengths share a few compiled shapes (Infini segments and ring shards need
the multiple too); each row keeps its own length.

`split_answer(record)` cuts a training/eval record into (prompt, answer):
the answer is the trailing run of predicted segments. Imports numpy, the
batch contract, gemjax.data's sequence builder and the tokenizers' layout.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import numpy as np

from gemjax.batch import CONTINUOUS_MODALITIES, patch_keys
from gemjax.data.sequence import SequenceBuilder, collate
from gemjax.errors import BadInputError

MEDIA_KINDS = ('image', 'audio', 'video')


def _read_media(seg: Mapping[str, Any], where: str) -> dict:
  seg = dict(seg)
  data = seg.get('data')
  if isinstance(data, (str, os.PathLike)):
    path = os.fspath(data)
    if not os.path.isfile(path):
      raise BadInputError(seg.get('kind', 'media'), where, f'no such file: {path}')
    with open(path, 'rb') as f:
      seg['data'] = f.read()
  return seg


def split_answer(record: Mapping[str, Any]) -> tuple[dict, list]:
  """(prompt record, answer segments): the answer is the trailing predicted segments."""
  segments = list(record['segments'])
  cut = len(segments)
  while cut > 0 and segments[cut - 1].get('predict', segments[cut - 1].get('kind') == 'text'):
    cut -= 1
  prompt = dict(record)
  prompt['segments'] = [dict(s, predict=False) for s in segments[:cut]]
  return prompt, segments[cut:]


class PromptEncoder:
  """Builds prompt batches with a run's `SequenceBuilder` (bos, no eos)."""

  def __init__(self, builder: SequenceBuilder, *, pad_multiple: int = 16,
               patch_multiple: int = 16):
    self.builder = copy.copy(builder)
    self.builder.add_eos = False
    self.layout = builder.layout
    self.pad_multiple, self.patch_multiple = pad_multiple, patch_multiple

  def example(self, record: Mapping[str, Any], where: str = 'prompt') -> dict:
    if not isinstance(record, Mapping) or not isinstance(record.get('segments'), (list, tuple)):
      raise BadInputError('record', where, "a prompt is a dict with a 'segments' list")
    segs = [(_read_media(s, f'{where}:segments[{i}]') if isinstance(s, Mapping)
             and s.get('kind') in MEDIA_KINDS else s) for i, s in enumerate(record['segments'])]
    return self.builder.build(dict(record, segments=segs), source=where)

  def batch(self, records: Sequence[Mapping[str, Any]], *, rows: int | None = None,
            min_length: int = 0, where: str = 'prompt') -> tuple[dict, np.ndarray]:
    """(batch, lengths): one row per record, padded to `rows` rows (copies of
    the first prompt, to fill a mesh's batch shards) and to at least
    `min_length` tokens."""
    if not records:
      raise ValueError('PromptEncoder.batch: no prompts')
    examples = [self.example(r, f'{where}[{i}]') for i, r in enumerate(records)]
    return self.collate(examples, rows=rows, min_length=min_length)

  def collate(self, examples: Sequence[Mapping[str, np.ndarray]], *, rows: int | None = None,
              min_length: int = 0) -> tuple[dict, np.ndarray]:
    lengths = np.asarray([len(ex['tokens']) for ex in examples], np.int32)
    T = bucket(max(int(lengths.max()), min_length, 1), self.pad_multiple)
    budgets = {}
    for m in CONTINUOUS_MODALITIES:
      n = max(len(ex[patch_keys(m)[1]]) for ex in examples)
      if n:
        budgets[m] = bucket(n, self.patch_multiple)
    examples = list(examples)
    while rows and len(examples) < rows:
      examples.append(examples[0])
    batch = collate(examples, T, budgets, pad_id=self.layout.pad)
    return batch, lengths

  def decode(self, ids: Sequence[int], stop_tokens: Sequence[int] = ()) -> str:
    """Text of generated ids: up to the first stop token, special tokens dropped."""
    out = []
    for t in ids:
      t = int(t)
      if t in stop_tokens:
        break
      if self.layout.is_text(t):
        out.append(t)
    return self.builder.text.decode(out)


def bucket(n: int, m: int) -> int:
  """The smallest m * 2**k >= n (k >= 0): a shape bucket. Padding costs at
  most 2x the length; each new bucket costs a compile."""
  m = max(int(m), 1)
  out = m
  while out < n:
    out *= 2
  return out
