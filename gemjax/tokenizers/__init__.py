"""Host-side tokenizers: text, image, audio, video -> ids and patches (numpy).

Everything here runs on the host, in data-loader workers, with numpy and media
libraries only (no JAX). The vocabulary layout that places special tokens and
image codes after the text ids lives in `vocab.py` and nowhere else.

Names are imported lazily (PEP 562) so that `python -m gemjax.tokenizers.text`
runs its module once, and importing one tokenizer does not load the media
libraries of the others.
"""

import importlib

_EXPORTS = {
    'AudioTokenizer': 'audio', 'AudioTokens': 'audio',
    'ImageTokenizer': 'image', 'ImageTokens': 'image', 'image_grid': 'image',
    'patchify': 'image', 'unpatchify': 'image',
    'ByteTokenizer': 'text', 'HFTokenizer': 'text', 'SentencePieceTokenizer': 'text',
    'load_text_tokenizer': 'text', 'train_sentencepiece': 'text',
    'VideoTokenizer': 'video', 'VideoTokens': 'video',
    'SPECIAL_NAMES': 'vocab', 'VocabLayout': 'vocab',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return __all__
