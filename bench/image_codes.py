"""FSQ image tokenizer quality on the sample digits: PSNR, SSIM, code usage,
and an independent classifier's accuracy on reconstructions vs originals.

    python bench/image_codes.py [--tokenizer data/sample/image_codes] [--retrain]

Loads the shipped tokenizer (or, with --retrain, trains one again with the
settings recorded in its config.json and times it), encodes -> decodes the
test and train digits, and prints a markdown table. PSNR is over all pixels
of a split (10 log10(255^2 / MSE)); SSIM is the mean per image (Wang et al.
2004, 7x7 uniform window; checked against scikit-image when installed).
Training time is what train() measured (compile included) on this machine.
The classifier (gemjax/eval/digits.py) was trained on real training digits
only; a tokenizer that keeps what makes a digit readable scores the same on
its reconstructions as on the originals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from gemjax.tokenizers import image_codes as ic

SPLITS = {'test': 'data/sample/test/image_digit-*', 'train': 'data/sample/train/image_digit-*'}


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--tokenizer', default='data/sample/image_codes')
  parser.add_argument('--retrain', action='store_true')
  args = parser.parse_args()

  with open(os.path.join(args.tokenizer, ic.CONFIG_FILE)) as f:
    meta = json.load(f)
  info = meta.get('train', {})
  tok = ic.ImageCodeTokenizer.load(args.tokenizer)
  train_seconds = info.get('train_seconds')
  if args.retrain:
    images, _ = ic.read_images(info.get('data', SPLITS['train']))
    tok, hist = ic.train(tok.config, images, steps=info['steps'],
                         batch_size=info['batch_size'],
                         learning_rate=info['learning_rate'], seed=info['seed'])
    train_seconds = hist['train_seconds']

  try:
    from skimage.metrics import structural_similarity
  except ImportError:
    structural_similarity = None

  from gemjax.eval.digits import default_classifier, load_digits
  clf = default_classifier()
  rows = []
  for split, pattern in SPLITS.items():
    images, _ = ic.read_images(pattern)
    x_orig, labels = load_digits(pattern)
    recon_x = tok.decode(tok.encode(x_orig))[..., 0]
    acc = (float(np.mean(clf.predict(x_orig) == labels)),
           float(np.mean(clf.predict(recon_x) == labels)))
    t0 = time.perf_counter()
    m = ic.evaluate(tok, images)
    seconds = time.perf_counter() - t0
    check = ''
    if structural_similarity is not None:
      x, _ = tok.prepare(images)
      recon = tok.decode(tok.encode(x))
      sk = np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255)
                    for a, b in zip(x, recon)])
      check = f'{sk:.4f}'
    rows.append((split, m, seconds, check, acc))

  cfg = tok.config
  print(f'FSQ image tokenizer `{args.tokenizer}`: {cfg.image_size}px x{cfg.channels} -> '
        f'{cfg.grid[0]}x{cfg.grid[1]} grid, levels {cfg.levels} = {cfg.num_codes} codes, '
        f'widths {cfg.widths}; trained {info.get("steps")} steps, batch '
        f'{info.get("batch_size")}, seed {info.get("seed")} in '
        f'{train_seconds if train_seconds is None else round(train_seconds, 1)} s '
        f'({"retrained here" if args.retrain else "as recorded at training"}); '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n')
  print('| split | images | PSNR (dB) | SSIM | SSIM (scikit-image) | codes used | '
        'code usage | classifier: originals | classifier: reconstructions | '
        'encode+decode (s) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for split, m, seconds, check, (a0, a1) in rows:
    print(f'| {split} | {m["images"]} | {m["psnr"]:.2f} | {m["ssim"]:.4f} | '
          f'{check or "n/a"} | {m["codes_used"]} / {tok.num_codes} | '
          f'{100 * m["code_usage"]:.1f}% | {a0:.1%} | {a1:.1%} | {seconds:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
