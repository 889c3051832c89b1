"""Hugging Face tokenizer.json text tokenizers (HFTokenizer, load_text_tokenizer).

The tokenizers are trained here, in well under a second, on the sample
corpus's documentation text (data/sample/*/text_lm-*), in the two shapes real
tokenizer.json files take: Llama-3 (regex split + byte-level BPE) and Llama-2
(metaspace normalizer + BPE with byte fallback). Each carries a post-processor
that prepends its bos, so that add_special_tokens=False is observable.
transformers' PreTrainedTokenizerFast over the same file is the reference.
"""

import json
import pickle

import numpy as np
import pytest

from gemjax.errors import ConfigError
from gemjax.tokenizers.text import ByteTokenizer, HFTokenizer, load_text_tokenizer
from gemjax.tokenizers.vocab import NUM_SPECIAL, SPECIAL_NAMES
from support import sample_text

tk = pytest.importorskip('tokenizers')

# Unicode and whitespace edge cases: leading / doubled spaces, tabs, CRLF,
# blank lines, accents (composed and combining), CJK, emoji (with ZWJ), RTL,
# digits runs, a lone '▁', and an added token written in the text.
SAMPLES = (
    'Return the value of the named attribute of object.',
    '  leading spaces,  double  spaces and trailing ',
    'tabs\tand\r\nCRLF\n\n\nblank lines\n',
    'héllo café naïve — “quotes” and e\u0301 combining',
    '日本語のテキスト 世界 🙂 👩\u200d💻 مرحبا',
    'numbers 1234567 3.14159 0x1F ▁ already-marked',
    'def f(x):\n    return x ** 2  # comment',
    '',
    ' ',
)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_like(corpus: list[str]):
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
      tk.pre_tokenizers.Split(tk.Regex(LLAMA3_SPLIT), behavior='isolated'),
      tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
      vocab_size=600, special_tokens=['<|begin_of_text|>', '<|end_of_text|>'],
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  tok.post_processor = tk.processors.TemplateProcessing(
      single='<|begin_of_text|> $A', special_tokens=[('<|begin_of_text|>', 0)])
  return tok


def _llama2_like(corpus: list[str]):
  """Llama-2's tokenizer.json layout: '▁' normalizer, BPE whose vocabulary
  holds the 256 <0xNN> byte pieces (byte fallback), and the matching decoder."""
  tok = tk.Tokenizer(tk.models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  tok.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend('▁'),
                                            tk.normalizers.Replace(' ', '▁')])
  tok.decoder = tk.decoders.Sequence([
      tk.decoders.Replace('▁', ' '), tk.decoders.ByteFallback(), tk.decoders.Fuse(),
      tk.decoders.Strip(' ', 1, 0)])
  trainer = tk.trainers.BpeTrainer(vocab_size=600, special_tokens=['<unk>', '<s>', '</s>'],
                                   show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  bpe = json.loads(tok.to_str())['model']
  vocab = bpe['vocab']
  for b in range(256):   # byte pieces are ordinary vocabulary, as in Llama-2
    vocab.setdefault(f'<0x{b:02X}>', len(vocab))
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in bpe['merges']]
  tok.model = tk.models.BPE(vocab, merges, unk_token='<unk>', byte_fallback=True,
                            fuse_unk=True)
  tok.post_processor = tk.processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', 1)])
  return tok


@pytest.fixture(scope='module')
def corpus():
  return sample_text('validation')


@pytest.fixture(scope='module', params=['llama3', 'llama2'])
def hf_file(request, corpus, tmp_path_factory):
  """(flavour, path of a tokenizer.json inside a model-like folder)."""
  build = {'llama3': _llama3_like, 'llama2': _llama2_like}[request.param]
  folder = tmp_path_factory.mktemp(f'hf_{request.param}')
  build(corpus).save(str(folder / 'tokenizer.json'))
  return request.param, str(folder / 'tokenizer.json')


@pytest.fixture(scope='module')
def llama3_file(corpus, tmp_path_factory):
  path = tmp_path_factory.mktemp('hf_llama3') / 'tokenizer.json'
  _llama3_like(corpus).save(str(path))
  return str(path)


def test_hf_ids_match_transformers_without_special_tokens(hf_file, corpus):
  transformers = pytest.importorskip('transformers')
  _, path = hf_file
  ours = load_text_tokenizer(path)
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  literal = '</s>' if '</s>' in ref.get_vocab() else '<|end_of_text|>'
  texts = [*SAMPLES, corpus[0][:2000], f'before {literal} after']
  for text in texts:
    ids = ours.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == ref.encode(text, add_special_tokens=False), text
  # The file's post-processor would prepend its bos; gemjax adds its own.
  with_bos = ours.tokenizer.encode('abc').ids
  assert with_bos[1:] == ours.encode('abc').tolist() == ref.encode('abc')[1:]
  assert with_bos[0] not in ours.encode('abc').tolist()
  # An added token written in the text is its own id, as in transformers.
  assert ref.convert_tokens_to_ids(literal) in ours.encode(f'x {literal} y').tolist()


def test_hf_decode_round_trips_unicode_and_whitespace(hf_file, corpus):
  flavour, path = hf_file
  tok = load_text_tokenizer(path)
  for text in (*SAMPLES, corpus[1][:3000]):
    if flavour == 'llama2' and '▁' in text:
      continue   # Llama-2's format reads a literal '▁' back as a space
    assert tok.decode(tok.encode(text)) == text, (flavour, text)
  if flavour == 'llama3':   # byte-level: even the added-token text survives
    text = 'a <|end_of_text|> b'
    assert tok.decode(tok.encode(text)) == text


def test_hf_decode_drops_gemjax_special_and_image_code_ids(llama3_file):
  tok = load_text_tokenizer(llama3_file, num_image_codes=4)
  L = tok.layout
  text_ids = tok.encode('the named attribute')
  ids = np.concatenate([[L.bos], text_ids, [L.begin_image, L.image_code_id(3),
                                            L.end_image, L.eos, L.pad, -1]])
  assert tok.decode(ids) == 'the named attribute'
  assert tok.decode([]) == ''


def test_hf_layout_puts_specials_after_the_whole_pretrained_vocab(llama3_file):
  tok = load_text_tokenizer(llama3_file, num_image_codes=8)
  hf = tk.Tokenizer.from_file(llama3_file)
  n = hf.get_vocab_size(with_added_tokens=True)
  assert tok.layout.text_size == n
  assert max(hf.get_vocab(with_added_tokens=True).values()) == n - 1  # added tokens in range
  assert tok.layout.special_start == n and tok.layout.pad == n
  assert list(tok.layout.special_ids().values()) == list(range(n, n + len(SPECIAL_NAMES)))
  assert tok.layout.image_code_start == n + NUM_SPECIAL
  assert tok.layout.image_code_id(0) == n + NUM_SPECIAL
  assert tok.layout.size == n + NUM_SPECIAL + 8
  assert tok.encode(' '.join(SAMPLES)).max() < n


def test_hf_text_size_covers_ids_past_a_gap(tmp_path):
  # A vocabulary whose ids skip numbers: counting tokens would give 3 and put
  # gemjax's pad on 'world'; the text range must reach the largest id.
  hf = tk.Tokenizer(tk.models.WordLevel({'[UNK]': 0, 'hello': 1, 'world': 7},
                                        unk_token='[UNK]'))
  hf.pre_tokenizer = tk.pre_tokenizers.Whitespace()
  path = tmp_path / 'tokenizer.json'
  hf.save(str(path))
  tok = load_text_tokenizer(str(path))
  assert tok.encode('hello world').tolist() == [1, 7]
  assert tok.layout.text_size == 8


def test_hf_tokenizer_pickles_for_worker_processes(llama3_file):
  tok = load_text_tokenizer(llama3_file, num_image_codes=8)
  clone = pickle.loads(pickle.dumps(tok))
  assert isinstance(clone, HFTokenizer) and clone.path == tok.path
  assert clone.layout == tok.layout
  for text in SAMPLES:
    np.testing.assert_array_equal(clone.encode(text), tok.encode(text))
  assert repr(clone) == repr(tok) == (f'HFTokenizer({llama3_file!r}, '
                                      f'text_size={tok.layout.text_size})')


def test_load_text_tokenizer_accepts_a_folder_a_file_and_bytes(llama3_file, tmp_path):
  import os
  folder = os.path.dirname(llama3_file)
  by_folder = load_text_tokenizer(folder)
  assert isinstance(by_folder, HFTokenizer) and by_folder.path == llama3_file
  # JSON content is recognised without the .json suffix.
  renamed = tmp_path / 'my_tokenizer'
  renamed.write_bytes(open(llama3_file, 'rb').read())
  assert isinstance(load_text_tokenizer(str(renamed)), HFTokenizer)
  from_bytes = HFTokenizer(open(llama3_file, 'rb').read())
  assert from_bytes.layout == by_folder.layout and from_bytes.path is None
  assert isinstance(load_text_tokenizer('bytes'), ByteTokenizer)


def test_non_json_files_still_go_to_sentencepiece(tmp_path):
  # (tests/unit/test_tokenizers_text.py loads real .model files.)
  junk = tmp_path / 'tokenizer.model'
  junk.write_bytes(b'\x0a\x05hello not a model')
  with pytest.raises(ConfigError, match='not a SentencePiece model'):
    load_text_tokenizer(str(junk))


def test_bad_tokenizer_paths_raise_errors_naming_the_file(tmp_path, llama3_file):
  missing = tmp_path / 'nope' / 'tokenizer.json'
  with pytest.raises(ConfigError, match=r"'.*nope/tokenizer.json'.*no such file"):
    load_text_tokenizer(str(missing))
  empty_folder = tmp_path / 'model_without_tokenizer'
  empty_folder.mkdir()
  with pytest.raises(ConfigError, match=r'model_without_tokenizer.*has no tokenizer.json'):
    load_text_tokenizer(str(empty_folder))
  (empty_folder / 'tokenizer.model').write_bytes(b'x')
  with pytest.raises(ConfigError, match=r'SentencePiece model.*tokenizer.model'):
    load_text_tokenizer(str(empty_folder))
  config = tmp_path / 'config.json'
  config.write_text(json.dumps({'model_type': 'llama', 'vocab_size': 32000}))
  with pytest.raises(ConfigError, match=r"config.json' is not a Hugging Face "
                                        r'tokenizer.json: expected .*"model" section'):
    load_text_tokenizer(str(config))
  listing = tmp_path / 'list.json'
  listing.write_text('[1, 2, 3]')
  with pytest.raises(ConfigError, match=r'list.json.*found a JSON list'):
    load_text_tokenizer(str(listing))
  broken = tmp_path / 'broken.json'
  broken.write_text('{"model": ')
  with pytest.raises(ConfigError, match=r'broken.json.*not valid JSON'):
    load_text_tokenizer(str(broken))
  wrong = tmp_path / 'wrong.json'
  spec = json.loads(open(llama3_file).read())
  spec['model']['type'] = 'NoSuchModel'
  wrong.write_text(json.dumps(spec))
  with pytest.raises(ConfigError, match=r'tokenizers library cannot load .*wrong.json'):
    load_text_tokenizer(str(wrong))


def test_sequence_builder_and_config_use_a_tokenizer_json(llama3_file):
  from gemjax.config import load_config
  from gemjax.data import registry
  from gemjax.data.sequence import SequenceBuilder
  tok = load_text_tokenizer(llama3_file)
  text = sample_text('test')[0][:1500]
  record = {'segments': [{'kind': 'text', 'text': 'Summarise:', 'predict': False},
                         {'kind': 'text', 'text': text, 'predict': True}]}
  builder = SequenceBuilder(tok)
  ex = builder.build(record, source='text_lm[0]')
  L = builder.layout
  body = tok.encode('Summarise:').tolist() + tok.encode(text).tolist()
  assert ex['tokens'].tolist() == [L.bos] + body + [L.eos]
  assert ex['targets'].tolist() == body + [L.eos, L.pad]
  assert not ex['modality'].any()
  assert tok.decode(ex['tokens']) == 'Summarise:' + text
  # A pickled builder (a Grain worker's copy) builds the same example.
  clone = pickle.loads(pickle.dumps(builder))
  np.testing.assert_array_equal(clone.build(record)['tokens'], ex['tokens'])
  # The config's data.tokenizer takes the file; vocab_size must cover the layout.
  size = tok.layout.size
  cfg = load_config('configs/nano.yaml', [f'data.tokenizer={llama3_file}',
                                          "data.image_codes=''", f'model.vocab_size={size}'])
  assert isinstance(registry.text_tokenizer(cfg), HFTokenizer)
  assert registry.sequence_builder(cfg).build(record)['tokens'].tolist() == ex['tokens'].tolist()
  with pytest.raises(ConfigError, match=r'model.vocab_size=.*tokenizer.json'):
    registry.text_tokenizer(load_config('configs/nano.yaml', [
        f'data.tokenizer={llama3_file}', "data.image_codes=''", f'model.vocab_size={size - 1}']))
