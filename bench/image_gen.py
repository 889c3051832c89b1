"""Image generation quality of a trained run, judged by an independent classifier.

    python bench/image_gen.py runs/nano [--per-digit 50] [--temperature 0.25] \
        [--scales 1 1.5 2 2.5 3 5] [--seed 0]

For every guidance scale: draws `per-digit` images of each digit 0-9 from the
prompt "Draw the digit d." (constrained decoding, classifier-free guidance,
temperature sampling), then reports

  - well formed: image blocks of exactly H*W codes, then end-image
  - accuracy: the fraction the digit classifier (gemjax/eval/digits.py,
    trained on real training digits only, never on generated ones) reads as
    the requested digit; its accuracy on real test digits is the ceiling
  - FD: Frechet distance between classifier features of the generated images
    and of the real test digits; real train vs real test is the floor
  - NN: mean pixel L2 distance of each image to its nearest training image
    (generated vs real test digits: a model that copies training images would
    sit far below the real test digits)

and the interleaved task ("Draw a digit, then name it."): the fraction whose
text names the digit the classifier reads in the model's own image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemjax.eval import digits as digits_lib  # noqa: E402
from gemjax.eval.drawing import image_grid  # noqa: E402
from gemjax.inference.decode import SamplingConfig  # noqa: E402
from gemjax.inference.generator import Generator  # noqa: E402


def draw(gen: Generator, prompts, *, scale, sampling, seed, batch=32):
  images, ok, texts = [], 0, []
  rng = jax.random.key(seed)
  for s in range(0, len(prompts), batch):
    rng, sub = jax.random.split(rng)
    answers = gen.generate_multimodal(prompts[s:s + batch], max_new_tokens=64,
                                      sampling=sampling, rng=sub,
                                      guidance_scale=None if scale == 1 else scale)
    for a in answers:
      ok += int(a.well_formed and len(a.images) == 1)
      images.append(a.images[0][..., 0] if a.images else np.zeros((28, 28), np.uint8))
      texts.append(a.text.strip())
  return np.stack(images), ok / len(prompts), texts


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('run', help='run dir (or config YAML) of a model trained with image codes')
  p.add_argument('--per-digit', type=int, default=50)
  p.add_argument('--scales', type=float, nargs='+', default=[1.0, 1.5, 2.0, 2.5, 3.0, 5.0])
  p.add_argument('--temperature', type=float, default=0.25)
  p.add_argument('--top-k', type=int, default=0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='bench/results/image_gen')
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  gen = Generator.from_checkpoint(args.run)
  clf = digits_lib.default_classifier()
  train_x, train_y = digits_lib.load_digits('data/sample/train/image_digit-*')
  test_x, test_y = digits_lib.load_digits('data/sample/test/image_digit-*')
  ceiling = float(np.mean(clf.predict(test_x) == test_y))
  f_train, f_test = clf.features(train_x), clf.features(test_x)
  floor = digits_lib.frechet_distance(f_train, f_test)
  nn_test = float(np.mean(digits_lib.nearest_neighbour_distance(test_x, train_x)))
  print(f'classifier on real test digits: {ceiling:.1%} (ceiling); FD real train vs test: '
        f'{floor:.2f} (floor); NN distance real test -> train: {nn_test:.3f}')

  sampling = (SamplingConfig(temperature=args.temperature, top_k=args.top_k)
              if args.temperature > 0 else SamplingConfig(greedy=True))
  want = np.repeat(np.arange(10), args.per_digit)
  prompts = [{'segments': [{'kind': 'text', 'text': f'Draw the digit {d}.'}]} for d in want]
  rows = []
  for scale in args.scales:
    t0 = time.perf_counter()
    imgs, ok, _ = draw(gen, prompts, scale=scale, sampling=sampling, seed=args.seed)
    secs = time.perf_counter() - t0
    acc = float(np.mean(clf.predict(imgs) == want))
    fd = digits_lib.frechet_distance(clf.features(imgs), f_test)
    nn = float(np.mean(digits_lib.nearest_neighbour_distance(imgs, train_x)))
    rows.append({'scale': scale, 'well_formed': ok, 'accuracy': acc, 'fd': fd, 'nn': nn,
                 'seconds': secs})
    image_grid([[im[..., None] for im in imgs[want == d][:10]] for d in range(10)],
               os.path.join(args.out, f'grid_scale{scale:g}.png'))
    print(f'scale {scale:g}: well formed {ok:.1%}, accuracy {acc:.1%}, FD {fd:.2f}, '
          f'NN {nn:.3f} ({secs:.1f} s)', flush=True)

  best = max(rows, key=lambda r: r['accuracy'])
  named_prompts = [{'segments': [{'kind': 'text', 'text': 'Draw a digit, then name it.'}]}] \
      * (10 * args.per_digit)
  imgs, ok_named, texts = draw(gen, named_prompts, scale=best['scale'], sampling=sampling,
                               seed=args.seed + 1)
  read = clf.predict(imgs)
  named = float(np.mean([t == str(r) for t, r in zip(texts, read)]))
  spread = np.bincount(read, minlength=10) / len(read)

  print()
  print(f'| guidance scale | well formed | classifier reads the requested digit | '
        f'FD to real test (floor {floor:.2f}) | NN to train (real test {nn_test:.3f}) |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['scale']:g} | {r['well_formed']:.1%} | {r['accuracy']:.1%} | {r['fd']:.2f} | "
          f"{r['nn']:.3f} |")
  print(f'\nclassifier ceiling (real test digits): {ceiling:.1%}')
  print(f"interleaved 'Draw a digit, then name it.' at scale {best['scale']:g}: well formed "
        f'{ok_named:.1%}, text names the drawn digit {named:.1%}; digits drawn: '
        + ' '.join(f'{d}:{s:.0%}' for d, s in enumerate(spread)))
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'rows': rows, 'ceiling': ceiling, 'fd_floor': floor, 'nn_test': nn_test,
               'named_as_drawn': named, 'named_well_formed': ok_named,
               'named_spread': spread.tolist()}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
