"""Text tokenizers: UTF-8 bytes (no dependencies), SentencePiece and Hugging Face.

Each maps a str to int32 ids in [0, layout.text_size) and back, and carries the
`VocabLayout` that places special tokens and image codes after the text ids.
None adds bos/eos: the sequence builder adds the layout's own ids, so the
same code path serves a byte model, a freshly trained SentencePiece model, a
user's Gemma/Llama `.model` file and a Hugging Face model's `tokenizer.json`.
`load_text_tokenizer` turns the config's `data.tokenizer` into one of them.

Train a SentencePiece model from a corpus (one document per line is fine):

    python -m gemjax.tokenizers.text train --input corpus.txt \
        --vocab-size 8000 --out /tmp/spm   # writes /tmp/spm.model, .vocab

This module imports numpy, sentencepiece and tokenizers (both lazily) and
gemjax.errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Protocol, Sequence

import numpy as np

from gemjax.errors import BadInputError, ConfigError
from gemjax.tokenizers.vocab import BYTE_TEXT_SIZE, VocabLayout


class TextTokenizer(Protocol):
  layout: VocabLayout

  def encode(self, text: str, *, source: str = '<text>') -> np.ndarray: ...

  def decode(self, ids) -> str: ...


def _check_text(text, source: str) -> str:
  if not isinstance(text, str):
    raise BadInputError('text', source, f'expected str, got {type(text).__name__}')
  return text


def _text_ids(ids, text_size: int) -> np.ndarray:
  """Keeps only text ids: special tokens and image codes have no text form."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  return ids[(ids >= 0) & (ids < text_size)]


class ByteTokenizer:
  """One id per UTF-8 byte: never fails, never needs a file (ids 0..255)."""

  def __init__(self, num_image_codes: int = 0):
    self.layout = VocabLayout(BYTE_TEXT_SIZE, num_image_codes)

  def encode(self, text: str, *, source: str = '<text>') -> np.ndarray:
    # 'surrogatepass' would emit invalid UTF-8 for lone surrogates (from badly
    # decoded JSON); 'replace' turns them into '?' so decode(encode(s)) is
    # always valid UTF-8.
    data = _check_text(text, source).encode('utf-8', errors='replace')
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = _text_ids(ids, BYTE_TEXT_SIZE)
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def __repr__(self):
    return f'ByteTokenizer(num_image_codes={self.layout.num_image_codes})'


class SentencePieceTokenizer:
  """A SentencePiece model (e.g. Gemma's or Llama's `tokenizer.model`).

  The text range is the model's whole piece table, including its own control
  pieces (<unk>, <s>, </s>); gemjax's special tokens come after it.
  """

  def __init__(self, model: str | os.PathLike | bytes, num_image_codes: int = 0):
    import sentencepiece as spm
    if isinstance(model, bytes):
      proto = model
      self.path = None
    else:
      self.path = os.fspath(model)
      try:
        with open(self.path, 'rb') as f:
          proto = f.read()
      except OSError as e:
        raise ConfigError(f'text tokenizer: cannot read SentencePiece model '
                          f'{self.path!r}: {e}') from None
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError
      raise ConfigError(f'text tokenizer: {self.path or "<bytes>"} is not a '
                        f'SentencePiece model: {e}') from None
    self.layout = VocabLayout(int(self._sp.GetPieceSize()), num_image_codes)

  @property
  def processor(self):
    """The underlying `sentencepiece.SentencePieceProcessor`."""
    return self._sp

  def encode(self, text: str, *, source: str = '<text>') -> np.ndarray:
    ids = self._sp.EncodeAsIds(_check_text(text, source))
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds(_text_ids(ids, self.layout.text_size).tolist())

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  # The processor is a C++ object; pickle the model bytes instead so that the
  # tokenizer can travel to Grain worker processes.
  def __getstate__(self):
    return {'proto': self._proto, 'path': self.path,
            'num_image_codes': self.layout.num_image_codes}

  def __setstate__(self, state):
    self.__init__(state['proto'], state['num_image_codes'])
    self.path = state['path']

  def __repr__(self):
    return (f'SentencePieceTokenizer({self.path or "<bytes>"!r}, '
            f'text_size={self.layout.text_size})')


HF_TOKENIZER_FILE = 'tokenizer.json'  # its name in a Hugging Face model folder


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer: a model's `tokenizer.json`.

  The text range is the whole pretrained vocabulary, added tokens included
  (<s>, <|begin_of_text|>, chat markers, ...): text_size is
  `get_vocab_size(with_added_tokens=True)`, or max id + 1 if the file's ids
  have gaps, so gemjax's special tokens and image codes come after every id
  the file can produce.

  encode calls the tokenizer with `add_special_tokens=False`: the file's
  post-processor (e.g. Llama's leading <|begin_of_text|>) is not applied, the
  sequence builder adds the layout's own bos/eos. An added token written
  literally in the text ('</s>') still encodes to its id, as in transformers.
  Truncation and padding saved in the file are switched off: a long record is
  never cut silently (the builder's max_length rejects it instead).

  decode drops ids outside [0, text_size) (gemjax specials, image codes), like
  the other tokenizers, and keeps the file's own special tokens
  (skip_special_tokens=False, transformers' default), so decode(encode(s)) == s
  for a lossless tokenizer (byte-level BPE, or BPE with byte fallback).

  Args:
    tokenizer: path of a tokenizer.json file, or its contents as bytes.
    num_image_codes: size of the image-code range of the layout.
  """

  def __init__(self, tokenizer: str | os.PathLike | bytes, num_image_codes: int = 0):
    if isinstance(tokenizer, bytes):
      data, self.path = tokenizer, None
    else:
      self.path = os.fspath(tokenizer)
      try:
        with open(self.path, 'rb') as f:
          data = f.read()
      except OSError as e:
        raise ConfigError(f'text tokenizer: cannot read Hugging Face tokenizer '
                          f'{self.path!r}: {e}') from None
    self._json = data
    self._tok = _parse_hf_tokenizer(data, self.path or '<bytes>')
    self._tok.no_truncation()
    self._tok.no_padding()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    text_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                    max(vocab.values(), default=-1) + 1)
    self.layout = VocabLayout(int(text_size), num_image_codes)

  @property
  def tokenizer(self):
    """The underlying `tokenizers.Tokenizer`."""
    return self._tok

  def encode(self, text: str, *, source: str = '<text>') -> np.ndarray:
    ids = self._tok.encode(_check_text(text, source), add_special_tokens=False).ids
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode(_text_ids(ids, self.layout.text_size).tolist(),
                            skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  # A `tokenizers.Tokenizer` pickles, but through its own JSON anyway; keep the
  # file's bytes so that a worker rebuilds exactly what the parent loaded.
  def __getstate__(self):
    return {'json': self._json, 'path': self.path,
            'num_image_codes': self.layout.num_image_codes}

  def __setstate__(self, state):
    self.__init__(state['json'], state['num_image_codes'])
    self.path = state['path']

  def __repr__(self):
    return (f'HFTokenizer({self.path or "<bytes>"!r}, '
            f'text_size={self.layout.text_size})')


def _parse_hf_tokenizer(data: bytes, where: str):
  """tokenizer.json bytes -> `tokenizers.Tokenizer`; ConfigError naming `where`."""
  what = f'text tokenizer: {where!r} is not a Hugging Face tokenizer.json'
  try:
    spec = json.loads(data.decode('utf-8-sig'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f'{what}: not valid JSON ({e})') from None
  if not isinstance(spec, dict) or not isinstance(spec.get('model'), dict):
    found = (f'keys {sorted(spec)[:8]}' if isinstance(spec, dict)
             else f'a JSON {type(spec).__name__}')
    hint = ''
    if isinstance(spec, dict) and ('tokenizer_class' in spec or 'model_type' in spec):
      hint = (f'; this looks like tokenizer_config.json / config.json: pass the '
              f'{HF_TOKENIZER_FILE} next to it, or the model folder')
    raise ConfigError(f'{what}: expected an object with a "model" section, found '
                      f'{found}{hint}')
  try:
    from tokenizers import Tokenizer
  except ImportError as e:
    raise ConfigError(f'text tokenizer {where!r}: reading a tokenizer.json needs the '
                      f'`tokenizers` package (pip install tokenizers): {e}') from None
  try:
    return Tokenizer.from_str(data.decode('utf-8-sig'))
  except Exception as e:  # tokenizers raises a bare Exception on bad fields
    raise ConfigError(f'text tokenizer: the tokenizers library cannot load {where!r} '
                      f'as a tokenizer.json: {e}') from None


def _looks_like_json(path: str) -> bool:
  """True if the file starts with '{' (after a BOM / whitespace): a SentencePiece
  model is a binary protobuf and never does."""
  with open(path, 'rb') as f:
    head = f.read(64)
  return head.removeprefix(b'\xef\xbb\xbf').lstrip().startswith(b'{')


def load_text_tokenizer(spec: str | os.PathLike, num_image_codes: int = 0) -> TextTokenizer:
  """The text tokenizer a config's `data.tokenizer` names.

    'bytes'                                  -> ByteTokenizer
    a SentencePiece `.model` file            -> SentencePieceTokenizer
    a Hugging Face `tokenizer.json` (a file
      named *.json or holding JSON), or a
      folder holding one (a model download)   -> HFTokenizer
  """
  spec = os.fspath(spec)
  if spec == 'bytes':
    return ByteTokenizer(num_image_codes)
  if os.path.isdir(spec):
    path = os.path.join(spec, HF_TOKENIZER_FILE)
    if os.path.isfile(path):
      return HFTokenizer(path, num_image_codes)
    spm_path = os.path.join(spec, 'tokenizer.model')
    hint = (f'; it has a SentencePiece model: set the tokenizer to {spm_path!r}'
            if os.path.isfile(spm_path) else '')
    raise ConfigError(f'text tokenizer {spec!r}: the folder has no '
                      f'{HF_TOKENIZER_FILE}{hint}')
  if os.path.isfile(spec):
    try:
      is_json = spec.lower().endswith('.json') or _looks_like_json(spec)
    except OSError as e:
      raise ConfigError(f'text tokenizer: cannot read {spec!r}: {e}') from None
    if is_json:
      return HFTokenizer(spec, num_image_codes)
    return SentencePieceTokenizer(spec, num_image_codes)
  raise ConfigError(f'text tokenizer {spec!r}: no such file or folder; expected '
                    f'"bytes", the path of an existing SentencePiece .model file, '
                    f'or of a Hugging Face tokenizer.json (or a folder holding one)')


def train_sentencepiece(inputs: str | Sequence[str], vocab_size: int, out_prefix: str, *,
                        model_type: str = 'unigram', byte_fallback: bool = True,
                        character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000, num_threads: int = 1,
                        quiet: bool = True) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on text files; writes `{out_prefix}.model`.

  byte_fallback keeps every input encodable (unknown characters become byte
  pieces, as in Gemma/Llama) at the cost of 256 pieces of the vocabulary.
  `hard_vocab_limit=False` lets a tiny corpus yield fewer pieces than asked
  instead of failing.
  """
  import sentencepiece as spm
  if isinstance(inputs, str):
    inputs = [inputs]
  for path in inputs:
    if not os.path.isfile(path):
      raise ConfigError(f'train_sentencepiece: input {path!r} does not exist')
  if model_type not in ('unigram', 'bpe', 'char', 'word'):
    raise ConfigError(f'train_sentencepiece: model_type {model_type!r}; valid: '
                      f'unigram, bpe, char, word')
  out_dir = os.path.dirname(out_prefix)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  spm.SentencePieceTrainer.Train(
      input=list(inputs), model_prefix=out_prefix, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=byte_fallback,
      character_coverage=character_coverage, hard_vocab_limit=False,
      input_sentence_size=max_sentences, shuffle_input_sentence=True,
      num_threads=num_threads, minloglevel=2 if quiet else 0,
      # Our ids for pad/bos/eos live outside the text range; keep SP's
      # defaults (unk=0, bos=1, eos=2) so existing tools still read the model.
      pad_id=-1)
  return SentencePieceTokenizer(out_prefix + '.model')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m gemjax.tokenizers.text',
                                   description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='cmd', required=True)
  tr = sub.add_parser('train', help='train a SentencePiece model on text files')
  tr.add_argument('--input', required=True, nargs='+', help='text file(s)')
  tr.add_argument('--vocab-size', required=True, type=int)
  tr.add_argument('--out', required=True, help='output prefix (writes PREFIX.model)')
  tr.add_argument('--model-type', default='unigram')
  tr.add_argument('--no-byte-fallback', action='store_true')
  tr.add_argument('--threads', type=int, default=1)
  enc = sub.add_parser('encode', help='print the ids of a string')
  enc.add_argument('--tokenizer', default='bytes',
                   help="'bytes', a SentencePiece .model or a tokenizer.json path")
  enc.add_argument('text')
  args = parser.parse_args(argv)
  if args.cmd == 'train':
    tok = train_sentencepiece(args.input, args.vocab_size, args.out,
                              model_type=args.model_type,
                              byte_fallback=not args.no_byte_fallback,
                              num_threads=args.threads)
    print(f'wrote {args.out}.model: {tok.layout.text_size} pieces; '
          f'VocabLayout.size = {tok.layout.size}')
  else:
    tok = load_text_tokenizer(args.tokenizer)
    print(' '.join(map(str, tok.encode(args.text).tolist())))
  return 0


if __name__ == '__main__':
  sys.exit(main())
