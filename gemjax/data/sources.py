"""Random-access data sources: ArrayRecord shards, TFDS, a folder, a JSONL file.

Every source here is a Grain `RandomAccessDataSource` (`__len__`,
`__getitem__`) whose items are small dicts that say where they came from::

  {'where': 'path/to/shard.array_record:17', 'record': bytes | dict}
  {'where': ..., 'error': [modality, reason]}     # the read itself failed

`record` is an encoded record (bytes, see `gemjax.data.records`) or an already
decoded record dict. Sources never raise for one bad record: they hand the
failure on, and the pipeline's bad-record policy decides (skip and count, or
raise). They DO raise at construction for problems with a whole file (missing,
corrupt, written by a newer format version), naming the file, so a run fails
in its first second rather than after an hour.

Sources are pickled into Grain worker processes: open file handles are
dropped on pickling and reopened lazily in the worker.

Imports: gemjax.errors, gemjax.data.records, array_record; tensorflow_datasets
and PIL only inside the TFDS source.
"""

from __future__ import annotations

import bisect
import glob
import io
import os
import threading
from typing import Any, Callable, Mapping, Sequence

from gemjax.data import records
from gemjax.errors import BadInputError


class ShardError(BadInputError):
  """A whole shard file is unusable (missing, corrupt, unknown version)."""

  def __init__(self, source: str, reason: str):
    super().__init__('record', source, reason)

  def __reduce__(self):
    return (type(self), (self.source, self.reason))


def resolve_shards(pattern: str | Sequence[str]) -> list[str]:
  """File list from: a list, a glob, a directory, a file, or a shard prefix."""
  if not isinstance(pattern, str):
    paths = [str(p) for p in pattern]
  elif any(c in pattern for c in '*?['):
    paths = sorted(glob.glob(pattern))
  elif os.path.isdir(pattern):
    paths = sorted(glob.glob(os.path.join(pattern, '*' + records.SHARD_SUFFIX)))
  elif os.path.isfile(pattern):
    paths = [pattern]
  else:
    paths = sorted(glob.glob(f'{pattern}-*-of-*{records.SHARD_SUFFIX}'))
  if not paths:
    raise ShardError(str(pattern), 'no ArrayRecord shard matches this path, '
                     'glob, directory or prefix')
  return paths


class ArrayRecordSource:
  """Records stored in ArrayRecord shards, indexed globally across shards.

  Construction opens every shard, checks it is a readable ArrayRecord file and
  that its first record is in a format version this gemjax reads; a failure
  raises ShardError naming the file.
  """

  def __init__(self, paths: str | Sequence[str], *, check_version: bool = True):
    from array_record.python import array_record_module  # C++ extension

    self._paths = resolve_shards(paths)
    counts = []
    for path in self._paths:
      if not os.path.isfile(path):
        raise ShardError(path, 'file does not exist')
      reader = array_record_module.ArrayRecordReader(path, 'readahead_buffer_size:0')
      try:
        if not reader.ok():
          raise ShardError(path, f'not a readable ArrayRecord file (corrupt or '
                           f'truncated; {os.path.getsize(path)} bytes)')
        n = reader.num_records()
        if check_version and n:
          try:
            first = reader.read([0])[0]
          except Exception as e:  # riegeli raises RuntimeError / ValueError
            raise ShardError(path, f'cannot read record 0: {e}') from e
          version = records.record_version(first)
          if version not in records.SUPPORTED_VERSIONS:
            raise ShardError(path, f'record format version {version!r} is not '
                             f'supported (this gemjax reads '
                             f'{list(records.SUPPORTED_VERSIONS)})')
      finally:
        try:
          reader.close()
        except Exception:  # closing a reader of a corrupt file raises again
          pass
      counts.append(n)
    self._starts = [0]
    for n in counts:
      self._starts.append(self._starts[-1] + n)
    self._local = threading.local()

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  def __len__(self) -> int:
    return self._starts[-1]

  def _reader(self, shard: int):
    # One reader per thread: Grain reads with a thread pool.
    readers = getattr(self._local, 'readers', None)
    if readers is None:
      readers = self._local.readers = {}
    if shard not in readers:
      from array_record.python import array_record_module
      readers[shard] = array_record_module.ArrayRecordReader(
          self._paths[shard], 'readahead_buffer_size:0')
    return readers[shard]

  def locate(self, index: int) -> tuple[str, int]:
    """Global index -> (shard path, index inside the shard)."""
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} records')
    shard = bisect.bisect_right(self._starts, index) - 1
    return self._paths[shard], index - self._starts[shard]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    path, local = self.locate(index)
    where = f'{path}:{local}'
    shard = bisect.bisect_right(self._starts, index) - 1
    try:
      return {'where': where, 'record': self._reader(shard).read([local])[0]}
    except Exception as e:  # a corrupt chunk inside an otherwise good file
      return {'where': where, 'error': ['record', f'cannot read: {e}']}

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop('_local')
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def __repr__(self):
    return f'ArrayRecordSource({len(self._paths)} shards, {len(self)} records)'


class FolderSource:
  """A folder of plain files (layout in `gemjax.data.records`), read lazily."""

  def __init__(self, folder: str):
    self._folder = folder
    self._entries = records.folder_entries(folder)
    if not self._entries:
      raise ShardError(folder, 'the folder holds no .json, .txt or media files')

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict[str, Any]:
    entry = self._entries[int(index)]
    try:
      return {'where': entry[1],
              'record': records.record_from_folder_entry(entry, self._folder)}
    except BadInputError as e:
      return {'where': entry[1], 'error': [e.modality, e.reason]}

  def __repr__(self):
    return f'FolderSource({self._folder!r}, {len(self)} records)'


class JsonlSource:
  """A JSONL manifest (one JSON record per line), indexed by line offsets."""

  def __init__(self, manifest: str):
    if not os.path.isfile(manifest):
      raise ShardError(manifest, 'file does not exist')
    self._manifest = manifest
    self._base_dir = os.path.dirname(os.path.abspath(manifest))
    self._offsets, self._lines = [], []
    with open(manifest, 'rb') as f:
      offset = 0
      for line_no, line in enumerate(f, 1):
        if line.strip():
          self._offsets.append(offset)
          self._lines.append(line_no)
        offset += len(line)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> dict[str, Any]:
    import json
    index = int(index)
    where = f'{self._manifest}:{self._lines[index]}'
    try:
      with open(self._manifest, 'rb') as f:
        f.seek(self._offsets[index])
        obj = json.loads(f.readline())
      if isinstance(obj, dict):
        obj.setdefault('id', where)
      return {'where': where,
              'record': records.record_from_json(obj, self._base_dir, where)}
    except BadInputError as e:
      return {'where': where, 'error': [e.modality, e.reason]}
    except (ValueError, OSError) as e:
      return {'where': where, 'error': ['record', f'invalid JSON line: {e}']}


class TfdsSource:
  """A TFDS dataset prepared in the array_record file format.

  Reads through `tfds.data_source` (random access, no TensorFlow needed).
  Each TFDS example becomes a record by `convert(example) -> record dict`; by
  default the example must have a `record` feature holding an encoded gemjax
  record (bytes). `ImageLabelToRecord` converts (image, label) datasets such
  as MNIST.
  """

  def __init__(self, name: str, split: str = 'train', *,
               data_dir: str | None = None,
               convert: Callable[[Mapping[str, Any]], dict] | None = None):
    self._name, self._split, self._data_dir = name, split, data_dir
    self._convert = convert
    self._ds = None
    self._length = len(self._open())

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds
      try:
        self._ds = tfds.data_source(
            self._name, split=self._split, data_dir=self._data_dir,
            builder_kwargs={'file_format': 'array_record'}, download=False)
      except Exception as e:  # tfds raises many types for a missing dataset
        raise ShardError(f'tfds:{self._name}/{self._split}',
                         f'cannot open the TFDS dataset in array_record format '
                         f'(data_dir={self._data_dir}): {e}') from e
    return self._ds

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    where = f'tfds:{self._name}/{self._split}:{index}'
    try:
      example = self._open()[index]
    except Exception as e:
      return {'where': where, 'error': ['record', f'cannot read: {e}']}
    try:
      if self._convert is None:
        if 'record' not in example:
          return {'where': where, 'error': ['record', 'example has no "record" '
                                            'feature and no convert function was given']}
        return {'where': where, 'record': bytes(example['record'])}
      return {'where': where, 'record': self._convert(example)}
    except BadInputError as e:
      return {'where': where, 'error': [e.modality, e.reason]}

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_ds'] = None
    return state

  def __repr__(self):
    return f'TfdsSource({self._name!r}, split={self._split!r}, {len(self)} records)'


class ImageLabelToRecord:
  """TFDS (image, label) example -> 'which class?' record (image as PNG)."""

  def __init__(self, image_key: str = 'image', label_key: str = 'label', *,
               task: str = 'image_class', prompt: str = 'What is this?',
               label_names: Sequence[str] | None = None):
    self.image_key, self.label_key = image_key, label_key
    self.task, self.prompt = task, prompt
    self.label_names = list(label_names) if label_names is not None else None

  def __call__(self, example: Mapping[str, Any]) -> dict:
    import numpy as np
    from PIL import Image

    image_HxWxC = np.asarray(example[self.image_key])
    if image_HxWxC.ndim == 3 and image_HxWxC.shape[-1] == 1:
      image_HxWxC = image_HxWxC[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image_HxWxC.astype(np.uint8)).save(buf, format='PNG')
    label = int(example[self.label_key])
    answer = self.label_names[label] if self.label_names else str(label)
    return {'id': str(example.get('id', '')), 'task': self.task, 'segments': [
        {'kind': 'image', 'data': buf.getvalue(), 'format': 'png', 'predict': False},
        {'kind': 'text', 'text': self.prompt, 'predict': False},
        {'kind': 'text', 'text': answer, 'predict': True}], 'meta': {'label': label}}


def open_source(kind: str, path: str, *, split: str = 'train',
                data_dir: str | None = None,
                convert: Callable[[Mapping[str, Any]], dict] | None = None):
  """Builds a source by kind: 'array_record' | 'tfds' | 'folder' | 'jsonl' |
  'auto' (folder if `path` is a directory of non-shard files, jsonl if it ends
  in .jsonl, tfds if it starts with 'tfds:', else ArrayRecord shards)."""
  if kind == 'auto':
    if path.startswith('tfds:'):
      kind, path = 'tfds', path[len('tfds:'):]
    elif path.endswith('.jsonl'):
      kind = 'jsonl'
    elif os.path.isdir(path) and not glob.glob(os.path.join(path, '*' + records.SHARD_SUFFIX)):
      kind = 'folder'
    else:
      kind = 'array_record'
  if kind == 'array_record':
    return ArrayRecordSource(path)
  if kind == 'tfds':
    return TfdsSource(path, split, data_dir=data_dir, convert=convert)
  if kind == 'folder':
    return FolderSource(path)
  if kind == 'jsonl':
    return JsonlSource(path)
  raise ValueError(f'unknown source kind {kind!r}; valid: auto, array_record, '
                   'tfds, folder, jsonl')
