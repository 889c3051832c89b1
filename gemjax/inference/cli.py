"""The generate CLI: answers from a trained checkpoint, streamed or in batches.

    python generate.py runs/nano --prompt "Which digit is this?" --image digit.png
    python generate.py configs/nano.yaml --prompt "The list" --max-new-tokens 64 \
        --temperature 0.8 --top-p 0.9
    python generate.py runs/nano --jsonl prompts.jsonl > answers.jsonl

The first argument is a run directory, a checkpoint step directory, or a
config YAML (whose train.run_dir holds the checkpoint); the model config is
always the one saved with the checkpoint. One prompt: media first (--image,
--audio, --video, in that order), then the text, as the training records are
laid out; the answer is streamed to stdout as it is generated. --jsonl: one
prompt record per line (`{"segments": [...]}` in the sequence-builder format,
media `data` as file paths, or `{"prompt": "...", "image": PATH, ...}`),
answered in batches of --batch-size; one JSON line per prompt on stdout.
Trailing `section.key=value` arguments override the mesh or data settings.
Exit status 2 on bad input (a missing or corrupt file, a prompt too long).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

import jax

from gemjax.errors import GemjaxError
from gemjax.inference.decode import SamplingConfig
from gemjax.inference.generator import Generator


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='generate.py', description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('checkpoint', help='run dir, checkpoint step dir, or config YAML')
  p.add_argument('overrides', nargs='*', help='section.key=value (mesh/data/eval)')
  p.add_argument('--prompt', default=None, help='the text of the prompt')
  p.add_argument('--image', action='append', default=[], help='image file (repeatable)')
  p.add_argument('--audio', action='append', default=[], help='audio file (repeatable)')
  p.add_argument('--video', action='append', default=[], help='video file (repeatable)')
  p.add_argument('--jsonl', default=None, help='batch mode: a JSONL file of prompts')
  p.add_argument('--batch-size', type=int, default=16, help='rows per batch (--jsonl)')
  p.add_argument('--max-new-tokens', type=int, default=64)
  p.add_argument('--max-len', type=int, default=None,
                 help='cache slots per row (default: prompt + max new tokens)')
  p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy (default)')
  p.add_argument('--top-k', type=int, default=0)
  p.add_argument('--top-p', type=float, default=1.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no-stream', action='store_true', help='print the answer at the end')
  return p


def record_of(text: str | None, images=(), audios=(), videos=()) -> dict:
  segments = ([{'kind': 'image', 'data': x} for x in images]
              + [{'kind': 'audio', 'data': x} for x in audios]
              + [{'kind': 'video', 'data': x} for x in videos])
  if text:
    segments.append({'kind': 'text', 'text': text, 'predict': False})
  return {'segments': segments}


def _as_list(x):
  return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def read_jsonl(path: str) -> list[dict]:
  from gemjax.errors import BadInputError
  out = []
  try:
    f = open(path)
  except OSError as e:
    raise BadInputError('prompt', path, f'cannot open the JSONL file: {e}') from None
  with f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadInputError('prompt', f'{path}:{n}', f'not JSON: {e}') from None
      if not isinstance(obj, dict):
        raise BadInputError('prompt', f'{path}:{n}', 'each line must be a JSON object')
      if 'segments' not in obj:
        obj = record_of(obj.get('prompt'), _as_list(obj.get('image')),
                        _as_list(obj.get('audio')), _as_list(obj.get('video')))
      out.append(obj)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  args = parser().parse_args(argv)
  if args.temperature > 0:
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  else:
    sampling = SamplingConfig(greedy=True)
  rng = jax.random.key(args.seed)
  try:
    if args.jsonl is None and not (args.prompt or args.image or args.audio or args.video):
      raise GemjaxError('give --prompt (and/or --image/--audio/--video), or --jsonl FILE')
    gen = Generator.from_checkpoint(args.checkpoint, args.overrides)
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, max_len=args.max_len)
    if args.jsonl is not None:
      prompts = read_jsonl(args.jsonl)
      for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        rng, sub = jax.random.split(rng)
        for i, ans in enumerate(gen.generate(chunk, rng=sub, **kw)):
          print(json.dumps({'index': start + i, 'answer': ans.text, 'tokens': ans.tokens,
                            'stopped': ans.stopped}), flush=True)
      return 0
    record = record_of(args.prompt, args.image, args.audio, args.video)
    if args.no_stream:
      print(gen.generate([record], rng=rng, **kw)[0].text)
    else:
      for piece in gen.stream(record, rng=rng, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
      sys.stdout.write('\n')
  except GemjaxError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0
