"""Evaluation of image output: records whose answer holds a predicted image.

For each such record the prompt (the record up to its trailing predicted
segments) is answered by constrained decoding with classifier-free guidance
(`Generator.generate_multimodal`). Reported per task:

  well_formed         every image block exactly H*W codes, then end_image
  drawn_as_requested  the answer is an image only (e.g. "Draw the digit 7."):
                      an independent digit classifier (gemjax/eval/digits.py,
                      trained on real training digits only) reads the drawn
                      image as the record's meta['digit']
  named_as_drawn      the answer is an image, then text (e.g. "Draw a digit,
                      then name it."): the text names the digit the
                      classifier reads in the model's own image

and a PNG grid of the drawn images, one row per requested digit.
Imports the inference room and the digit classifier.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import jax
import numpy as np

from gemjax.inference.decode import SamplingConfig
from gemjax.inference.prompts import bucket


def answer_has_image(answer_segments) -> bool:
  return any(s.get('kind') == 'image' and s.get('predict', False) for s in answer_segments)


class DrawingEval:
  """Collects image-answer records, generates in batches, scores, draws grids."""

  def __init__(self, gen, *, guidance_scale: float | None, sampling: SamplingConfig,
               batch_size: int = 16, seed: int = 0, classifier=None):
    self.gen, self.guidance_scale, self.sampling = gen, guidance_scale, sampling
    self.batch_size = batch_size
    self.rng = jax.random.key(seed)
    self.classifier = classifier
    self.pending: list[tuple[str, dict, list, Any]] = []
    self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self.images: dict[str, list[tuple[Any, np.ndarray]]] = collections.defaultdict(list)
    blocks = gen.image_blocks()
    self.max_new_tokens = 0
    self.blocks = blocks

  def add(self, task: str, prompt: Mapping, answer: list, meta: Mapping | None) -> None:
    text = sum(len(s.get('text', '')) for s in answer if s.get('kind') == 'text')
    n_images = sum(1 for s in answer if s.get('kind') == 'image')
    # Room for the answer's images and text (bytes) plus eos, as a bucket
    # (8 x a power of two): drawing and naming tasks share one compiled loop.
    need = n_images * self.blocks.block_length + 2 * text + 4
    self.max_new_tokens = max(self.max_new_tokens, bucket(need, 8))
    self.pending.append((task, dict(prompt), answer, (meta or {}).get('digit')))
    if len(self.pending) == self.batch_size:
      self.flush()

  def flush(self) -> None:
    if not self.pending:
      return
    self.rng, sub = jax.random.split(self.rng)
    # Always batch_size prompts (copies of the first fill the last batch; zip
    # below drops their answers): one compiled shape.
    prompts = [p for _, p, _, _ in self.pending]
    prompts += prompts[:1] * (self.batch_size - len(prompts))
    answers = self.gen.generate_multimodal(
        prompts, max_new_tokens=self.max_new_tokens,
        sampling=self.sampling, guidance_scale=self.guidance_scale, rng=sub)
    for (task, _, answer, digit), ans in zip(self.pending, answers):
      c = self.counts[task]
      c['records'] += 1
      c['well_formed'] += int(ans.well_formed and len(ans.images) >= 1)
      if not ans.images:
        continue
      img = ans.images[0]
      self.images[task].append((digit, img))
      if self.classifier is None or img.shape[:2] != (28, 28):
        continue
      read = int(self.classifier.predict(img[None, ..., :1])[0])
      wants_text = answer and answer[-1].get('kind') == 'text'
      if wants_text:
        c['named'] += 1
        c['named_as_drawn'] += int(ans.text.strip() == str(read))
      elif digit is not None:
        c['requested'] += 1
        c['drawn_as_requested'] += int(read == int(digit))
    self.pending.clear()

  def results(self) -> dict[str, dict]:
    self.flush()
    out = {}
    for task, c in sorted(self.counts.items()):
      n = max(c['records'], 1)
      r = {'records': c['records'], 'well_formed': c['well_formed'] / n,
           'guidance_scale': self.guidance_scale}
      if c['requested']:
        r['drawn_as_requested'] = c['drawn_as_requested'] / c['requested']
      if c['named']:
        r['named_as_drawn'] = c['named_as_drawn'] / c['named']
      out[task] = r
    return out

  def write_grids(self, out_dir: str, columns: int = 10) -> list[str]:
    """One PNG per task: a row per requested digit (or one row of samples)."""
    paths = []
    for task, items in sorted(self.images.items()):
      rows: dict[Any, list[np.ndarray]] = collections.defaultdict(list)
      for digit, img in items:
        rows[digit].append(img)
      path = os.path.join(out_dir, f'drawn_{task}.png')
      image_grid([rows[k][:columns] for k in sorted(rows, key=lambda d: (d is None, d))], path)
      paths.append(path)
    return paths


def image_grid(rows: list[list[np.ndarray]], path: str, scale: int = 2, gap: int = 2) -> None:
  """Writes rows of uint8 [H, W, C] images as one PNG (white gaps, scaled up)."""
  from PIL import Image
  h, w, ch = rows[0][0].shape
  ncol = max(len(r) for r in rows)
  H, W = len(rows) * (h * scale + gap) + gap, ncol * (w * scale + gap) + gap
  canvas = np.full((H, W, ch), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
      y, x = gap + i * (h * scale + gap), gap + j * (w * scale + gap)
      canvas[y:y + h * scale, x:x + w * scale] = big
  Image.fromarray(canvas[..., 0] if ch == 1 else canvas).save(path)
