"""`python -m gemjax.convert import|export ...` (see gemjax/convert/__init__.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from gemjax.errors import GemjaxError


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m gemjax.convert',
      description='Import Hugging Face safetensors checkpoints (Llama, Mistral, Mixtral, '
                  'Gemma 1/2/3 text) into gemjax, and export them back.')
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='HF model folder -> gemjax run directory')
  imp.add_argument('hf_dir', help='folder with config.json and *.safetensors')
  imp.add_argument('out_dir', help='new gemjax run directory (gemjax.yaml, 0/...)')
  imp.add_argument('--param-dtype', default='float32',
                   choices=['float32', 'bfloat16', 'float16'])
  imp.add_argument('--overwrite', action='store_true',
                   help='replace out_dir if it is not empty')
  imp.add_argument('--finetune', metavar='PRESET', default='',
                   help='also write out_dir/finetune.yaml from this preset (e.g. '
                        'configs/finetune-multimodal.yaml): python train.py it')
  exp = sub.add_parser('export', help='gemjax checkpoint -> HF model folder')
  exp.add_argument('checkpoint', help='gemjax run directory or step directory')
  exp.add_argument('out_dir', help='new HF model folder')
  exp.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                   help="tensor dtype (default: the imported model's, else the params')")
  exp.add_argument('--vocab-size', type=int, default=0,
                   help='keep only the first N vocabulary rows (e.g. the pretrained '
                        "tokenizer's, dropping gemjax's special and image-code rows)")
  exp.add_argument('--max-shard-gb', type=float, default=5.0)
  exp.add_argument('--overwrite', action='store_true')
  exp.add_argument('--allow-modality-embedding', action='store_true',
                   help="drop a trained text modality embedding (changes the model)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  from gemjax import convert
  try:
    if args.command == 'import':
      cfg = convert.import_hf(args.hf_dir, args.out_dir, param_dtype=args.param_dtype,
                              overwrite=args.overwrite)
      m = cfg.model
      print(f'wrote {args.out_dir}: {m.num_layers} layers, d_model {m.d_model}, vocab '
            f'{m.vocab_size}; config {args.out_dir}/gemjax.yaml')
      if args.finetune:
        path = convert.finetune_config(args.out_dir, args.finetune)
        print(f'wrote {path}: python train.py {path}')
    else:
      hf = convert.export_hf(args.checkpoint, args.out_dir, dtype=args.dtype,
                             vocab_size=args.vocab_size, max_shard_gb=args.max_shard_gb,
                             overwrite=args.overwrite,
                             allow_modality_embedding=args.allow_modality_embedding)
      print(f"wrote {args.out_dir}: {hf['architectures'][0]}, vocab {hf['vocab_size']}, "
            f"{hf['dtype']}")
  except GemjaxError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
