"""Cross-modal matching examples composed on the fly from two labelled datasets.

A matching task ("is the spoken digit the digit shown?") stored as fixed
pairs has only as many examples as were written, and a small model memorises
them instead of learning to compare. `MatchPairsSource` makes a fresh pair for
every index instead: record i takes a random record of `left` and, with
probability 1/2, a record of `right` with the same label (`meta[label_key]`),
else one with a different label. The composed record is

    <left's media segments> <right's media segments> <prompt> <yes | no>

with only the answer predicted, so it reads exactly like a stored matching
record and evaluates against stored test pairs. Each index is a pure function
of (seed, index), so the pipeline's shuffling, sharding and checkpointed
position work unchanged; `size` sets how many distinct pairs form one epoch.

Pair only datasets of the same split: the composed examples inherit the
split's sources (no image or voice crosses splits).

Imports numpy, gemjax.data.records and gemjax.errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemjax.data import records
from gemjax.errors import BadInputError, ConfigError


class MatchPairsSource:
  """Random-access source of composed matching records (see module doc)."""

  def __init__(self, left, right, *, label_key: str, prompt: str, size: int = 0,
               seed: int = 0, task: str = 'match', answers: tuple[str, str] = ('yes', 'no')):
    if not prompt:
      raise ConfigError("a 'pairs' dataset needs a prompt (data.datasets[].pair_prompt)")
    self.left, self.right = left, right
    self.label_key, self.prompt, self.task, self.answers = label_key, prompt, task, answers
    self.seed = seed
    self.size = size or len(left) * len(right)
    self._by_label: dict[Any, np.ndarray] | None = None

  def __len__(self) -> int:
    return self.size

  def _decode(self, source, index: int) -> dict:
    item = source[index]
    if 'error' in item:
      raise BadInputError(*item['error'][:1], item['where'], item['error'][-1])
    return records.decode_record(item['record'], item['where'])

  def _label(self, record: dict, where: str) -> Any:
    meta = record.get('meta') or {}
    if self.label_key not in meta:
      raise BadInputError('record', where, f"meta has no label {self.label_key!r} to pair on "
                          f'(keys: {sorted(meta)})')
    return meta[self.label_key]

  def _right_index(self) -> dict[Any, np.ndarray]:
    """label -> indices of `right` (built once per process, on first use)."""
    if self._by_label is None:
      labels: dict[Any, list[int]] = {}
      for j in range(len(self.right)):
        rec = self._decode(self.right, j)
        labels.setdefault(self._label(rec, f'{self.right!r}[{j}]'), []).append(j)
      if len(labels) < 2:
        raise ConfigError(f'pairs: {self.right!r} has {len(labels)} distinct '
                          f'{self.label_key!r} labels; matching needs at least 2')
      self._by_label = {k: np.asarray(v) for k, v in labels.items()}
    return self._by_label

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    rng = np.random.default_rng([self.seed, index])
    by_label = self._right_index()
    i = int(rng.integers(len(self.left)))
    where = f'pairs[{index}] of {self.left!r}[{i}]'
    try:
      left = self._decode(self.left, i)
      label = self._label(left, where)
      same = bool(rng.random() < 0.5) and label in by_label
      pool = (by_label[label] if same else
              np.concatenate([v for k, v in by_label.items() if k != label]))
      j = int(pool[rng.integers(len(pool))])
      right = self._decode(self.right, j)
    except BadInputError as e:
      return {'where': where, 'error': [e.modality, e.reason]}
    media = [s for rec in (left, right) for s in rec['segments']
             if s['kind'] in records.MEDIA_KINDS]
    composed = {
        'id': f'{self.task}/{index}', 'task': self.task,
        'segments': media + [
            {'kind': 'text', 'text': self.prompt, 'predict': False},
            {'kind': 'text', 'text': self.answers[0] if same else self.answers[1],
             'predict': True}],
        'meta': {'same': same, 'left_index': i, 'right_index': j,
                 f'left_{self.label_key}': label,
                 f'right_{self.label_key}': self._label(right, where)},
    }
    return {'where': where, 'record': records.encode_record(composed)}

  def __repr__(self):
    return f'MatchPairsSource({self.left!r} x {self.right!r}, {self.size} pairs)'
