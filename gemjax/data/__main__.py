"""Command line for data files: write shards, inspect shards.

    python -m gemjax.data write --from-folder DIR   --out PREFIX [--shards N]
    python -m gemjax.data write --from-jsonl FILE   --out PREFIX [--shards N]
    python -m gemjax.data inspect PATH_OR_GLOB [--show 3]

`write` validates every record (an invalid one stops the run, naming its file
or line) and writes PREFIX-00000-of-0000N.array_record ... round-robin.
`inspect` opens shards like the training pipeline does (so a corrupt file or
an unknown version fails the same way) and prints counts per task.

Imports gemjax.data.records and gemjax.data.sources only.
"""

from __future__ import annotations

import argparse
import collections
import sys

from gemjax.data import records, sources
from gemjax.errors import BadInputError


def _write(args) -> int:
  if args.from_folder:
    recs = records.records_from_folder(args.from_folder)
  else:
    recs = records.records_from_jsonl(args.from_jsonl)
  paths, counts = records.write_shards(recs, args.out, args.shards)
  for path, n in zip(paths, counts):
    print(f'{path}\t{n} records')
  print(f'wrote {sum(counts)} records to {len(paths)} shards '
        f'(format version {records.FORMAT_VERSION})')
  return 0


def _inspect(args) -> int:
  src = sources.ArrayRecordSource(args.path)
  tasks = collections.Counter()
  kinds = collections.Counter()
  bad = 0
  shown = 0
  for i in range(len(src)):
    item = src[i]
    try:
      if 'error' in item:
        raise BadInputError(item['error'][0], item['where'], item['error'][1])
      rec = records.decode_record(item['record'], item['where'])
    except BadInputError as e:
      bad += 1
      print(f'BAD {e}', file=sys.stderr)
      continue
    tasks[rec['task']] += 1
    kinds.update(seg['kind'] for seg in rec['segments'])
    if shown < args.show:
      shown += 1
      segs = ', '.join(
          f"text{'*' if s['predict'] else ''}({s['text'][:40]!r})" if s['kind'] == 'text'
          else f"{s['kind']}({s['format']}, {len(s['data'])} B)" for s in rec['segments'])
      print(f"{item['where']}  id={rec['id']} task={rec['task']}: {segs}")
  print(f'{len(src)} records in {len(src.paths)} shards; bad: {bad}')
  print('tasks:', dict(sorted(tasks.items())))
  print('segments:', dict(sorted(kinds.items())))
  return 1 if bad else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m gemjax.data', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  w = sub.add_parser('write', help='write ArrayRecord shards from a folder or JSONL')
  src = w.add_mutually_exclusive_group(required=True)
  src.add_argument('--from-folder', metavar='DIR')
  src.add_argument('--from-jsonl', metavar='MANIFEST')
  w.add_argument('--out', required=True, metavar='PREFIX',
                 help='shard prefix, e.g. data/mine/train')
  w.add_argument('--shards', type=int, default=1, metavar='N')
  i = sub.add_parser('inspect', help='count and show the records of shards')
  i.add_argument('path', help='shard file, glob, directory or prefix')
  i.add_argument('--show', type=int, default=3, help='records to print')
  args = parser.parse_args(argv)
  try:
    return _write(args) if args.command == 'write' else _inspect(args)
  except (BadInputError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
