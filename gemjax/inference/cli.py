"""The generate CLI: answers from a trained checkpoint, streamed or in batches.

    python generate.py runs/nano --prompt "Which digit is this?" --image digit.png
    python generate.py configs/nano.yaml --prompt "The list" --max-new-tokens 64 \
        --temperature 0.8 --top-p 0.9
    python generate.py runs/nano --jsonl prompts.jsonl > answers.jsonl
    python generate.py runs/nano --prompt "Draw the digit 7." --out drawn/ --guidance 3

The first argument is a run directory, a checkpoint step directory, or a
config YAML (whose train.run_dir holds the checkpoint); the model config is
always the one saved with the checkpoint. One prompt: media first (--image,
--audio, --video, in that order), then the text, as the training records are
laid out; the answer is streamed to stdout as it is generated. --jsonl: one
prompt record per line (`{"segments": [...]}` in the sequence-builder format,
media `data` as file paths, or `{"prompt": "...", "image": PATH, ...}`),
answered in batches of --batch-size; one JSON line per prompt on stdout.
Trailing `section.key=value` arguments override the mesh or data settings.
--out DIR: the answer may hold images (a model trained with data.image_codes):
decoding is constrained to well-formed image blocks, each image is written to
DIR as a PNG (`<index>-<k>.png`) and its path printed in place; --guidance S
applies classifier-free guidance to image codes (S > 1 follows the prompt more).
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
  p.add_argument('--out', default=None,
                 help='write generated images to this folder (text + image answers)')
  p.add_argument('--guidance', type=float, default=None,
                 help='classifier-free guidance scale on image codes (with --out)')
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


def _draw(gen: Generator, prompts: list[dict], args, rng, kw) -> int:
  """Text + image answers; images written to args.out as PNGs."""
  import os

  from PIL import Image
  os.makedirs(args.out, exist_ok=True)
  for start in range(0, len(prompts), args.batch_size):
    chunk = prompts[start:start + args.batch_size]
    rng, sub = jax.random.split(rng)
    answers = gen.generate_multimodal(chunk, rng=sub, guidance_scale=args.guidance, **kw)
    for i, ans in enumerate(answers):
      index, parts, paths = start + i, [], []
      for k, img in enumerate(ans.images):
        path = os.path.join(args.out, f'{index}-{k}.png')
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        paths.append(path)
      k = 0
      for kind, piece in ans.pieces:
        if kind == 'text':
          parts.append(piece)
        else:
          parts.append(f'[image: {paths[k]}]')
          k += 1
      if args.jsonl is not None:
        print(json.dumps({'index': index, 'answer': ans.text, 'images': paths,
                          'tokens': ans.tokens, 'stopped': ans.stopped,
                          'well_formed': ans.well_formed}), flush=True)
      else:
        print(''.join(parts), flush=True)
  return 0


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
    if args.guidance is not None and args.out is None:
      raise GemjaxError('--guidance applies to generated images: give --out DIR too')
    if args.out is not None:
      prompts = (read_jsonl(args.jsonl) if args.jsonl is not None
                 else [record_of(args.prompt, args.image, args.audio, args.video)])
      return _draw(gen, prompts, args, rng, kw)
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
