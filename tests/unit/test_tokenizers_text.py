"""Vocabulary layout and text tokenizers (bytes, SentencePiece train + load)."""

import pickle

import numpy as np
import pytest

from gemjax.errors import BadInputError, ConfigError
from gemjax.tokenizers import text as text_lib
from gemjax.tokenizers.text import (ByteTokenizer, SentencePieceTokenizer,
                                    load_text_tokenizer, train_sentencepiece)
from gemjax.tokenizers.vocab import NUM_SPECIAL, SPECIAL_NAMES, VocabLayout

WORDS = ('the cat sat on a mat while seven small dogs ran over green hills near '
         'the quiet water and birds sang').split()


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
  lines = [' '.join(rng.choice(WORDS, size=10)) for _ in range(300)]
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def spm_model(corpus, tmp_path_factory):
  prefix = tmp_path_factory.mktemp('spm') / 'tiny'
  tok = train_sentencepiece(str(corpus), vocab_size=300, out_prefix=str(prefix))
  return tok, str(prefix) + '.model'


def test_layout_places_specials_after_text_then_image_codes():
  layout = VocabLayout(text_size=1000, num_image_codes=64)
  ids = layout.special_ids()
  assert list(ids) == list(SPECIAL_NAMES)
  assert sorted(ids.values()) == list(range(1000, 1000 + len(SPECIAL_NAMES)))
  for name, i in ids.items():
    assert getattr(layout, name) == i
    assert layout.is_special(i) and not layout.is_text(i)
  assert layout.image_code_start == 1000 + NUM_SPECIAL
  assert layout.image_code_id(0) == layout.image_code_start
  assert layout.image_code_id(63) == layout.size - 1
  np.testing.assert_array_equal(layout.image_code_id(np.array([1, 2])),
                                layout.image_code_start + np.array([1, 2]))
  assert layout.size == 1000 + NUM_SPECIAL + 64
  with pytest.raises(ValueError):
    layout.image_code_id(64)


def test_byte_layout_has_256_text_ids():
  layout = ByteTokenizer().layout
  assert layout.text_size == 256 and layout.pad == 256
  assert layout.size == 256 + NUM_SPECIAL


def test_layout_is_frozen_and_hashable():
  layout = VocabLayout(10)
  with pytest.raises(Exception):
    layout.text_size = 11
  assert hash(layout) == hash(VocabLayout(10))


def test_byte_tokenizer_round_trips_unicode_and_skips_special_ids():
  tok = ByteTokenizer()
  s = 'héllo, 世界 🙂'
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert len(ids) == len(s.encode('utf-8'))
  assert tok.decode(ids) == s
  with_specials = np.concatenate([[tok.layout.bos], ids, [tok.layout.eos, tok.layout.placeholder]])
  assert tok.decode(with_specials) == s


def test_byte_tokenizer_rejects_non_text_and_survives_lone_surrogates():
  tok = ByteTokenizer()
  with pytest.raises(BadInputError) as e:
    tok.encode(b'bytes', source='doc7')
  assert e.value.modality == 'text' and e.value.source == 'doc7'
  assert tok.decode(tok.encode('a\ud800b')) == 'a?b'


def test_sentencepiece_train_then_load_round_trips(spm_model):
  trained, path = spm_model
  loaded = load_text_tokenizer(path)
  assert isinstance(loaded, SentencePieceTokenizer)
  assert loaded.layout == trained.layout
  text = 'the cat sat near seven green dogs'
  ids = loaded.encode(text)
  assert ids.dtype == np.int32
  assert 0 < len(ids) < len(text)  # pieces are longer than characters
  assert ids.max() < loaded.layout.text_size
  assert loaded.decode(ids) == text
  np.testing.assert_array_equal(trained.encode(text), ids)


def test_sentencepiece_byte_fallback_encodes_unseen_characters(spm_model):
  tok, _ = spm_model
  text = 'cat 日本 ok'
  assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_pickles_for_worker_processes(spm_model):
  tok, _ = spm_model
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode('the quiet water'), tok.encode('the quiet water'))
  assert clone.layout == tok.layout


def test_sentencepiece_decode_drops_special_and_code_ids(spm_model):
  tok, _ = spm_model
  layout = VocabLayout(tok.layout.text_size, 4)
  ids = np.concatenate([[layout.bos], tok.encode('the mat'), [layout.image_code_id(3)]])
  assert tok.decode(ids) == 'the mat'


def test_cli_train_writes_a_loadable_model(corpus, tmp_path, capsys):
  prefix = tmp_path / 'cli'
  assert text_lib.main(['train', '--input', str(corpus), '--vocab-size', '280',
                        '--out', str(prefix)]) == 0
  assert 'VocabLayout.size' in capsys.readouterr().out
  tok = load_text_tokenizer(str(prefix) + '.model')
  assert tok.decode(tok.encode('birds sang')) == 'birds sang'


def test_load_text_tokenizer_specs(tmp_path):
  assert isinstance(load_text_tokenizer('bytes'), ByteTokenizer)
  assert load_text_tokenizer('bytes', num_image_codes=8).layout.num_image_codes == 8
  with pytest.raises(ConfigError, match='no_such.model'):
    load_text_tokenizer(str(tmp_path / 'no_such.model'))
  junk = tmp_path / 'junk.model'
  junk.write_bytes(b'not a sentencepiece model')
  with pytest.raises(ConfigError, match='not a SentencePiece model'):
    load_text_tokenizer(str(junk))
