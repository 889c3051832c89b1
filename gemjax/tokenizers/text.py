"""Text tokenizers: UTF-8 bytes (no dependencies) and SentencePiece.

Both map a str to int32 ids in [0, layout.text_size) and back, and carry the
`VocabLayout` that places special tokens and image codes after the text ids.
Neither adds bos/eos: the sequence builder adds the layout's own ids, so the
same code path serves a byte model, a freshly trained SentencePiece model and a
user's Gemma/Llama `.model` file.

Train a SentencePiece model from a corpus (one document per line is fine):

    python -m gemjax.tokenizers.text train --input corpus.txt \
        --vocab-size 8000 --out /tmp/spm   # writes /tmp/spm.model, .vocab

This module imports numpy, sentencepiece (lazily) and gemjax.errors.
"""

from __future__ import annotations

import argparse
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


def load_text_tokenizer(spec: str,
                        num_image_codes: int = 0) -> ByteTokenizer | SentencePieceTokenizer:
  """'bytes' -> ByteTokenizer; a path to a `.model` file -> SentencePiece."""
  if spec == 'bytes':
    return ByteTokenizer(num_image_codes)
  if os.path.isfile(spec):
    return SentencePieceTokenizer(spec, num_image_codes)
  raise ConfigError(f'text tokenizer {spec!r}: expected "bytes" or the path of '
                    f'an existing SentencePiece .model file')


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
  enc.add_argument('--tokenizer', default='bytes', help="'bytes' or a .model path")
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
