"""The vocabulary layout: the one place that says which id means what.

gemjax has ONE output vocabulary shared by every modality (Chameleon, Emu3):

    [0, text_size)                         text pieces of the text tokenizer
    [text_size, text_size + NUM_SPECIAL)   special tokens (below), then spares
    [image_code_start, size)               discrete image codes (VQ tokenizers)

The special tokens, in order from `text_size`:

    pad, bos, eos, begin_image, end_image, begin_audio, end_audio,
    begin_video, end_video, frame_sep, placeholder, then reserved spares

`placeholder` marks a position whose embedding is not looked up in the table
but scattered in from a continuous patch embedding (see `gemjax/batch.py`).
Text tokenizers never emit their own bos/eos/pad: a SentencePiece model's
control pieces (a tokenizer.json's added tokens) stay inside the text range
but gemjax uses the ids above, so a layout is a pure function of
(text_size, num_image_codes) and the model config's `vocab_size` must equal
`VocabLayout.size`.

This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses

# Named special tokens, in id order from text_size. Append new names only at
# the end (taking a spare), never reorder: checkpoints depend on these ids.
SPECIAL_NAMES: tuple[str, ...] = (
    'pad', 'bos', 'eos',
    'begin_image', 'end_image',
    'begin_audio', 'end_audio',
    'begin_video', 'end_video',
    'frame_sep',
    'placeholder',
)
# Named + spare ids. 16 keeps the image-code range aligned and leaves 5 spares.
NUM_SPECIAL = 16
assert len(SPECIAL_NAMES) <= NUM_SPECIAL

BYTE_TEXT_SIZE = 256  # the byte tokenizer: one id per UTF-8 byte value


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  """Where text, special tokens and image codes live in the one vocabulary.

  Attributes:
    text_size: number of text ids, [0, text_size).
    num_image_codes: size of the discrete image-code range (0: none).
  Named special ids are attributes: `layout.pad`, `layout.bos`, `layout.eos`,
  `layout.begin_image`, `layout.end_image`, `layout.begin_audio`,
  `layout.end_audio`, `layout.begin_video`, `layout.end_video`,
  `layout.frame_sep`, `layout.placeholder`.
  """

  text_size: int
  num_image_codes: int = 0

  def __post_init__(self):
    if not isinstance(self.text_size, int) or self.text_size < 1:
      raise ValueError(f'VocabLayout.text_size must be a positive int, got '
                       f'{self.text_size!r}')
    if not isinstance(self.num_image_codes, int) or self.num_image_codes < 0:
      raise ValueError(f'VocabLayout.num_image_codes must be an int >= 0, got '
                       f'{self.num_image_codes!r}')

  # Named ids as properties (not fields) so that they can never disagree with
  # text_size.
  pad = property(lambda self: self.special_id('pad'))
  bos = property(lambda self: self.special_id('bos'))
  eos = property(lambda self: self.special_id('eos'))
  begin_image = property(lambda self: self.special_id('begin_image'))
  end_image = property(lambda self: self.special_id('end_image'))
  begin_audio = property(lambda self: self.special_id('begin_audio'))
  end_audio = property(lambda self: self.special_id('end_audio'))
  begin_video = property(lambda self: self.special_id('begin_video'))
  end_video = property(lambda self: self.special_id('end_video'))
  frame_sep = property(lambda self: self.special_id('frame_sep'))
  placeholder = property(lambda self: self.special_id('placeholder'))

  @property
  def special_start(self) -> int:
    return self.text_size

  @property
  def image_code_start(self) -> int:
    return self.text_size + NUM_SPECIAL

  @property
  def size(self) -> int:
    """Total vocabulary size; the model config's vocab_size must equal it."""
    return self.image_code_start + self.num_image_codes

  def special_id(self, name: str) -> int:
    try:
      return self.text_size + SPECIAL_NAMES.index(name)
    except ValueError:
      raise KeyError(f'no special token {name!r}; known: {SPECIAL_NAMES}') from None

  def special_ids(self) -> dict[str, int]:
    """name -> id of every named special token."""
    return {name: self.text_size + k for k, name in enumerate(SPECIAL_NAMES)}

  def image_code_id(self, code):
    """Vocabulary id of discrete image code `code` (an int or an int array)."""
    import numpy as np  # local: keep this module importable without numpy
    codes = np.asarray(code)
    if codes.size and (codes.min() < 0 or codes.max() >= self.num_image_codes):
      raise ValueError(f'image code out of range [0, {self.num_image_codes}): '
                       f'min {codes.min()}, max {codes.max()}')
    ids = codes.astype(np.int64) + self.image_code_start
    return int(ids) if ids.ndim == 0 else ids.astype(np.int32)

  def is_text(self, token_id: int) -> bool:
    return 0 <= token_id < self.text_size

  def is_special(self, token_id: int) -> bool:
    return self.text_size <= token_id < self.image_code_start

  def is_image_code(self, token_id: int) -> bool:
    return self.image_code_start <= token_id < self.size

  def name_of(self, token_id: int) -> str:
    """Human-readable name of an id, for debugging dumps."""
    if self.is_text(token_id):
      return f'text:{token_id}'
    if self.is_special(token_id):
      k = token_id - self.text_size
      return f'<{SPECIAL_NAMES[k]}>' if k < len(SPECIAL_NAMES) else f'<spare{k}>'
    if self.is_image_code(token_id):
      return f'code:{token_id - self.image_code_start}'
    return f'<out of vocab {token_id}>'
