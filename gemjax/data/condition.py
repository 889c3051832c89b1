"""Condition dropout for classifier-free guidance (Ho & Salimans 2022).

To sample an image with guidance, the model must know both p(image | prompt)
and p(image): at inference each step mixes the logits of a conditional row
and an unconditional row, l_u + s (l_c - l_u). One model learns both when a
fraction of its training records lose their conditioning.

The unconditional form of a record is `drop_condition(record)`: every text
segment that is not predicted and comes before the first predicted image
(an 'image' or 'image_code' segment with predict=True) is removed; all other
segments (media inputs, the image, anything after it) stay in order. So

    [text 'Draw the digit 7.', image*]             -> [image*]
    [text 'Draw a digit, then name it.', image*, text* '7'] -> [image*, text* '7']

(* = predicted), which the sequence builder turns into
`bos, begin_image, codes, end_image, ...`. Inference builds its
unconditional row from exactly this function, so training and guidance agree
on what "no condition" is. A record with no predicted image is returned
unchanged.

At inference the image comes after the prompt, and everything in a prompt is
context, so the unconditional prompt is `unconditional_prompt(prompt)`: the
prompt without its text segments (media kept). For a record r whose answer
starts at its first predicted image, the two agree: the prompt part of
`drop_condition(r)` is `unconditional_prompt(prompt part of r)`.

`drops_condition(p, seed, stream, index)` is the training coin: a pure
function of its arguments (the pipeline passes the run seed, the dataset and
process, and the element's position in the shuffled, repeated stream, which
encodes the epoch), so a resumed run drops exactly the same records.

Imports numpy only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

_IMAGE_KINDS = ('image', 'image_code', 'image_codes')


def _predicted(seg: Mapping[str, Any]) -> bool:
  # The sequence builder's default: text is predicted unless told otherwise.
  return bool(seg.get('predict', seg.get('kind') == 'text'))


def first_predicted_image(segments: Sequence[Mapping[str, Any]]) -> int | None:
  """Index of the first predicted image segment, or None."""
  for i, seg in enumerate(segments):
    if isinstance(seg, Mapping) and seg.get('kind') in _IMAGE_KINDS and _predicted(seg):
      return i
  return None


def drop_condition(record: Mapping[str, Any]) -> dict:
  """The unconditional form of a record (see the module docstring); a new
  dict, the input is not modified."""
  segments = list(record['segments'])
  first = first_predicted_image(segments)
  if first is None:
    return dict(record)
  kept = [s for i, s in enumerate(segments)
          if i >= first or not (isinstance(s, Mapping) and s.get('kind') == 'text'
                                and not _predicted(s))]
  return dict(record, segments=kept)


def unconditional_prompt(prompt: Mapping[str, Any]) -> dict:
  """A prompt (context only; the image to draw follows it) without its
  condition: every text segment removed, media kept, bos alone if nothing is
  left. A new dict."""
  return dict(prompt, segments=[s for s in prompt['segments']
                                if not (isinstance(s, Mapping) and s.get('kind') == 'text')])


def drops_condition(p: float, seed: int, stream: Sequence[int], index: int) -> bool:
  """True with probability p, as a pure function of (seed, stream, index)."""
  if p <= 0:
    return False
  rng = np.random.default_rng([int(seed), *map(int, stream), int(index)])
  return bool(rng.random() < p)
