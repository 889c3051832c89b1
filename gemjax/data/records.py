"""The on-disk record format: one multimodal document, versioned, in msgpack.

This room turns the in-memory record dict into bytes and back, writes
ArrayRecord shards, and reads the two plain inputs a user starts from (a folder
of files, a JSONL manifest). It knows nothing about tokens; the sequence
builder (`gemjax.data.sequence`) turns a record into an example.

In memory a record is::

  {'id': str, 'task': str,
   'segments': [{'kind': 'text', 'text': str, 'predict': bool},
                {'kind': 'image' | 'audio' | 'video', 'data': bytes,
                 'format': 'png' | 'wav' | 'mp4' | ..., 'predict': bool}, ...],
   'meta': {str: msgpack-able value}}

`predict=True` marks the segments the model is trained to produce (the answer
of a task); the rest is context.

On disk (format version 1) a record is ONE msgpack map, stored as one entry of
an ArrayRecord shard::

  {'format': 'gemjax.record', 'version': 1, 'id': ..., 'task': ...,
   'segments': [...as above, media 'data' as msgpack bin...], 'meta': {...}}

A reader rejects a version it does not know with an error that names the
version and the source, so old code never half-reads newer data. Shards are
named `{prefix}-{i:05d}-of-{n:05d}.array_record` (the TFDS convention).

Folder input (`records_from_folder`), files sorted by path:
  - `NAME.json`: one record in the JSON form below;
  - `NAME.txt` with no media file of the same stem: a text-only record
    (task 'text', the whole text is predicted);
  - `NAME.png|jpg|jpeg|gif|bmp|webp|wav|flac|ogg|mp3|mp4|webm|avi|mov`: a media
    record; with a `NAME.txt` next to it the text is its caption (predicted).
JSON form (folder `.json` files and each line of a JSONL manifest): the record
dict where a media segment gives `"path"` (relative to the JSON file's folder)
or `"data_b64"` instead of `"data"`; `"format"` defaults to the extension.

Imports the standard library, msgpack and gemjax.errors; array_record only
inside the writer. No numpy, no media libraries.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import msgpack

from gemjax.errors import BadInputError

FORMAT_NAME = 'gemjax.record'
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MEDIA_KINDS = ('image', 'audio', 'video')
SEGMENT_KINDS = ('text',) + MEDIA_KINDS
SHARD_SUFFIX = '.array_record'

# group_size:1 keeps every record independently readable (random access costs
# one record, not a group); zstd per record shrinks text and raw PCM audio.
ARRAY_RECORD_OPTIONS = 'group_size:1,zstd:9'

EXTENSION_KINDS = {
    'png': 'image', 'jpg': 'image', 'jpeg': 'image', 'gif': 'image',
    'bmp': 'image', 'webp': 'image',
    'wav': 'audio', 'flac': 'audio', 'ogg': 'audio', 'mp3': 'audio',
    'mp4': 'video', 'webm': 'video', 'avi': 'video', 'mov': 'video',
}


def validate_record(record: Mapping[str, Any], source: str = 'record') -> dict:
  """Checks the in-memory form; returns a normalised copy (predict filled in).

  Raises BadInputError('record', source, reason) naming the bad field.
  """
  if not isinstance(record, Mapping):
    raise BadInputError('record', source, f'expected a dict, got {type(record).__name__}')
  for key in ('id', 'task'):
    if not isinstance(record.get(key), str):
      raise BadInputError('record', source, f'field {key!r} must be a string, '
                          f'got {record.get(key)!r:.60}')
  segments = record.get('segments')
  if not isinstance(segments, (list, tuple)) or not segments:
    raise BadInputError('record', source, 'field "segments" must be a non-empty list')
  out_segments = []
  for i, seg in enumerate(segments):
    where = f'segments[{i}]'
    if not isinstance(seg, Mapping):
      raise BadInputError('record', source, f'{where} must be a dict')
    kind = seg.get('kind')
    if kind not in SEGMENT_KINDS:
      raise BadInputError('record', source, f'{where}.kind is {kind!r}; '
                          f'valid kinds are {SEGMENT_KINDS}')
    predict = seg.get('predict', False)
    if not isinstance(predict, bool):
      raise BadInputError('record', source, f'{where}.predict must be a bool')
    if kind == 'text':
      if not isinstance(seg.get('text'), str):
        raise BadInputError('record', source, f'{where}.text must be a string')
      out_segments.append({'kind': 'text', 'text': seg['text'], 'predict': predict})
    else:
      data, fmt = seg.get('data'), seg.get('format')
      if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise BadInputError(kind, source, f'{where}.data must be non-empty bytes')
      if not isinstance(fmt, str) or not fmt:
        raise BadInputError(kind, source, f'{where}.format must name the '
                            'encoding (png, wav, mp4, ...)')
      out_segments.append({'kind': kind, 'data': bytes(data),
                           'format': fmt.lower(), 'predict': predict})
  meta = record.get('meta', {})
  if not isinstance(meta, Mapping):
    raise BadInputError('record', source, 'field "meta" must be a dict')
  return {'id': record['id'], 'task': record['task'], 'segments': out_segments,
          'meta': dict(meta)}


def encode_record(record: Mapping[str, Any]) -> bytes:
  """Record dict -> bytes in the current format version (validated first)."""
  rec = validate_record(record, source=f'record {record.get("id", "?")!r}'
                        if isinstance(record, Mapping) else 'record')
  try:
    return msgpack.packb({'format': FORMAT_NAME, 'version': FORMAT_VERSION, **rec},
                         use_bin_type=True)
  except (TypeError, ValueError) as e:
    raise BadInputError('record', f'record {rec["id"]!r}',
                        f'meta is not msgpack-serialisable: {e}') from e


def decode_record(data: bytes, source: str) -> dict:
  """Bytes -> record dict. `source` (e.g. 'shard.array_record:17') is named
  in every error, which is a BadInputError('record', source, reason)."""
  try:
    obj = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several unrelated types
    raise BadInputError('record', source, f'not a gemjax record: msgpack '
                        f'decoding failed ({type(e).__name__}: {e})') from e
  if not isinstance(obj, dict) or obj.get('format') != FORMAT_NAME:
    raise BadInputError('record', source, f'not a gemjax record: no '
                        f'format={FORMAT_NAME!r} field')
  version = obj.get('version')
  if version not in SUPPORTED_VERSIONS:
    raise BadInputError('record', source, f'record format version {version!r} '
                        f'is not supported (this gemjax reads versions '
                        f'{list(SUPPORTED_VERSIONS)}); rewrite the data with '
                        '`python -m gemjax.data write` or update gemjax')
  return validate_record(obj, source)


def record_version(data: bytes) -> Any:
  """The version field of an encoded record, or None if it has none."""
  try:
    obj = msgpack.unpackb(data, raw=False)
  except Exception:
    return None
  return obj.get('version') if isinstance(obj, dict) else None


# ---------------------------------------------------------------- shards


def shard_paths(prefix: str, num_shards: int) -> list[str]:
  return [f'{prefix}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}'
          for i in range(num_shards)]


def write_shards(records: Iterable[Mapping[str, Any]], prefix: str,
                 num_shards: int = 1, *, options: str = ARRAY_RECORD_OPTIONS
                 ) -> tuple[list[str], list[int]]:
  """Writes records round-robin into `num_shards` ArrayRecord files.

  Round-robin keeps shards within one record of each other in size, so that a
  reader that splits work by shard stays balanced. Returns (paths, counts).
  Every record is validated before anything is written for it; an invalid one
  raises BadInputError naming its id.
  """
  from array_record.python import array_record_module  # heavy C++ extension

  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  paths = shard_paths(prefix, num_shards)
  folder = os.path.dirname(prefix)
  if folder:
    os.makedirs(folder, exist_ok=True)
  writers = [array_record_module.ArrayRecordWriter(p, options) for p in paths]
  counts = [0] * num_shards
  try:
    for i, record in enumerate(records):
      writers[i % num_shards].write(encode_record(record))
      counts[i % num_shards] += 1
  finally:
    for w in writers:
      w.close()
  return paths, counts


# ---------------------------------------------------------------- JSON inputs


def _media_format(path: str) -> str:
  return os.path.splitext(path)[1].lstrip('.').lower()


def record_from_json(obj: Mapping[str, Any], base_dir: str, source: str) -> dict:
  """The JSON form (media by `path` or `data_b64`) -> record dict."""
  if not isinstance(obj, Mapping):
    raise BadInputError('record', source, 'a JSON record must be an object')
  segments = []
  for i, seg in enumerate(obj.get('segments') or []):
    if not isinstance(seg, Mapping):
      raise BadInputError('record', source, f'segments[{i}] must be an object')
    seg = dict(seg)
    if seg.get('kind') in MEDIA_KINDS and 'data' not in seg:
      if 'path' in seg:
        path = os.path.join(base_dir, seg.pop('path'))
        try:
          with open(path, 'rb') as f:
            seg['data'] = f.read()
        except OSError as e:
          raise BadInputError(seg['kind'], source, f'segments[{i}]: cannot read '
                              f'{path}: {e.strerror}') from e
        seg.setdefault('format', _media_format(path))
      elif 'data_b64' in seg:
        try:
          seg['data'] = base64.b64decode(seg.pop('data_b64'), validate=True)
        except ValueError as e:
          raise BadInputError(seg['kind'], source, f'segments[{i}].data_b64 is '
                              f'not base64: {e}') from e
      else:
        raise BadInputError(seg['kind'], source, f'segments[{i}] needs "path" '
                            'or "data_b64"')
    segments.append(seg)
  rec = {**obj, 'segments': segments}
  rec.setdefault('meta', {})
  return validate_record(rec, source)


def records_from_jsonl(manifest: str) -> Iterator[dict]:
  """Yields the records of a JSONL manifest (one JSON record per line)."""
  base_dir = os.path.dirname(os.path.abspath(manifest))
  with open(manifest, encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      source = f'{manifest}:{line_no}'
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadInputError('record', source, f'invalid JSON: {e}') from e
      if isinstance(obj, dict):
        obj.setdefault('id', f'{os.path.basename(manifest)}:{line_no}')
      yield record_from_json(obj, base_dir, source)


def folder_entries(folder: str) -> list[tuple[str, ...]]:
  """The records of a folder as tuples of files (see module doc), sorted.

  Each entry is ('json', path) | ('text', path) | ('media', path[, caption]).
  Listing is cheap (no file is read), so a random-access source can call it
  at start-up and read files lazily.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'data folder {folder!r} does not exist')
  files = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in sorted(names)
                 if not n.startswith('.'))
  files.sort()
  stems_with_media = {os.path.splitext(p)[0] for p in files
                      if _media_format(p) in EXTENSION_KINDS}
  entries = []
  for path in files:
    stem, ext = os.path.splitext(path)
    ext = ext.lstrip('.').lower()
    if ext == 'json':
      entries.append(('json', path))
    elif ext == 'txt' and stem not in stems_with_media:
      entries.append(('text', path))
    elif ext in EXTENSION_KINDS:
      caption = stem + '.txt'
      entries.append(('media', path, caption) if os.path.exists(caption)
                     else ('media', path))
  return entries


def record_from_folder_entry(entry: Sequence[str], folder: str) -> dict:
  """Reads the files of one `folder_entries` entry into a record dict."""
  kind, path = entry[0], entry[1]
  rel_id = os.path.splitext(os.path.relpath(path, folder))[0]
  try:
    if kind == 'json':
      with open(path, encoding='utf-8') as f:
        try:
          obj = json.load(f)
        except json.JSONDecodeError as e:
          raise BadInputError('record', path, f'invalid JSON: {e}') from e
      if isinstance(obj, dict):
        obj.setdefault('id', rel_id)
      return record_from_json(obj, os.path.dirname(path), path)
    if kind == 'text':
      with open(path, encoding='utf-8') as f:
        text = f.read()
      return validate_record({'id': rel_id, 'task': 'text', 'segments': [
          {'kind': 'text', 'text': text, 'predict': True}]}, path)
    fmt = _media_format(path)
    with open(path, 'rb') as f:
      data = f.read()
    segments = [{'kind': EXTENSION_KINDS[fmt], 'data': data, 'format': fmt,
                 'predict': False}]
    task = EXTENSION_KINDS[fmt]
    if len(entry) > 2:
      with open(entry[2], encoding='utf-8') as f:
        segments.append({'kind': 'text', 'text': f.read().strip(), 'predict': True})
      task = 'caption'
    return validate_record({'id': rel_id, 'task': task, 'segments': segments}, path)
  except UnicodeDecodeError as e:
    raise BadInputError('text', path, f'not UTF-8 text: {e}') from e
  except OSError as e:
    raise BadInputError('record', path, f'cannot read: {e.strerror}') from e


def records_from_folder(folder: str) -> Iterator[dict]:
  for entry in folder_entries(folder):
    yield record_from_folder_entry(entry, folder)
