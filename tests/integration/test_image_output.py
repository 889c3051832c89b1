"""Image output: the decoding grammar of image blocks, their positions, and
classifier-free guidance.

Most tests drive `generate_multimodal` with a stand-in model whose logits are
a fixed function of each fed token and its index (with begin_image pushed up
so that images start often): the grammar, the per-row state and the positions
are checked on hundreds of sampled tokens without a transformer's compile
time. The last tests run a real tiny decoder through the `Generator`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemjax.batch import IMAGE_CODE, TEXT
from gemjax.config import load_config
from gemjax.data.sequence import SequenceBuilder, collate
from gemjax.inference import decode
from gemjax.inference.generator import Generator
from gemjax.inference.multimodal import (ImageBlocks, generate_multimodal, split_pieces,
                                         unconditional_prompt)
from gemjax.inference.prompts import PromptEncoder
from gemjax.model.spec import decoder_spec
from gemjax.tokenizers.text import ByteTokenizer

CODES = 16
GRID = (2, 3)
TOK = ByteTokenizer(num_image_codes=CODES)
LAYOUT = TOK.layout
BLOCKS = ImageBlocks.from_layout(LAYOUT, GRID)
V = LAYOUT.size


class FakeCodes:
  """An image-code tokenizer stand-in: codes are the pixel values."""
  num_codes = CODES
  grid = GRID

  def encode(self, image):
    img = np.asarray(image)
    return (img.reshape(GRID) % CODES).astype(np.int32)

  def decode(self, codes):
    return (np.asarray(codes)[..., None] * 16).astype(np.uint8)


class Scripted:
  """Logits = a fixed function of (fed token, token index), plus `boost` on
  begin_image. Cache-free: the index travels in the batch."""

  def __init__(self, boost=2.0):
    self.boost = boost

  def init_cache(self, batch_size, max_len, dtype=None):
    return jnp.zeros((batch_size,), jnp.int32)

  def __call__(self, batch, cache=None, *, prefill=False):
    tok = batch['tokens'].astype(jnp.float32)
    idx = batch.get('token_index')
    if idx is None:
      idx = jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape)
    v = jnp.arange(V, dtype=jnp.float32)
    logits = 3.0 * jnp.sin(0.37 * v * (idx[..., None] + 1.0) + 1.3 * tok[..., None])
    logits = logits.at[..., LAYOUT.begin_image].add(self.boost)
    return logits, {}, cache


def prompt_batch(texts, T=32):
  builder = SequenceBuilder(TOK, add_eos=False)
  exs = [builder.build({'segments': [{'kind': 'text', 'text': t, 'predict': False}]})
         for t in texts]
  return collate(exs, T, {}, pad_id=LAYOUT.pad), builder


@jax.jit
def _sampled(batch, rng):
  return generate_multimodal(Scripted(boost=3.5), batch, rng, blocks=BLOCKS, max_new_tokens=40,
                             max_len=64, sampling=decode.SamplingConfig(temperature=1.0))


def test_sampled_output_never_puts_codes_outside_an_image_block_nor_text_inside_one():
  batch, _ = prompt_batch([f'p{i}' * (1 + i % 3) for i in range(16)])
  out = _sampled(batch, jax.random.key(3))
  toks, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
  images = text_tokens = 0
  for row, n in zip(toks, lengths):
    ids = row[:n].tolist()
    inside = False
    count = 0
    for t in ids:
      is_code = LAYOUT.is_image_code(t)
      if inside:
        if count < BLOCKS.num_tokens:
          assert is_code, f'token {t} inside an image block'
          count += 1
        else:
          assert t == LAYOUT.end_image, 'a block must end right after H*W codes'
          inside = False
          images += 1
      else:
        assert not is_code and t != LAYOUT.end_image, 'a code outside an image block'
        assert t < LAYOUT.text_size or t in (LAYOUT.eos, LAYOUT.begin_image)
        if t == LAYOUT.begin_image:
          inside, count = True, 0
        elif t != LAYOUT.eos:
          text_tokens += 1
    assert not inside, 'the budget must never cut an image block'
    pieces, ok = split_pieces(ids, BLOCKS)
    assert ok
    assert all(p.codes.shape == GRID for p in pieces if p.kind == 'image')
  # The run exercised both modes, many times.
  assert images >= 16 and text_tokens >= 16


def test_begin_image_is_banned_when_the_budget_cannot_hold_a_whole_image():
  # Budget 9 = one block (8) + 1: the second begin_image can never come.
  batch, _ = prompt_batch(['a', 'bb'])
  out = jax.jit(lambda b: generate_multimodal(Scripted(boost=50.0), b, jax.random.key(0),
                                              blocks=BLOCKS, max_new_tokens=9, max_len=32))(batch)
  toks = np.asarray(out.tokens_BxN)
  for row in toks:
    assert row[0] == LAYOUT.begin_image and row[BLOCKS.block_length - 1] == LAYOUT.end_image
    assert row[-1] != LAYOUT.begin_image
  # With one token less, not even the first image fits.
  out = jax.jit(lambda b: generate_multimodal(Scripted(boost=50.0), b, jax.random.key(0),
                                              blocks=BLOCKS, max_new_tokens=7, max_len=32))(batch)
  assert not np.isin(np.asarray(out.tokens_BxN), [LAYOUT.begin_image]).any()


def test_positions_of_generated_codes_equal_the_sequence_builders_for_the_same_image():
  batch, builder = prompt_batch(['Draw the digit 7.', 'x'])
  out = jax.jit(lambda b: generate_multimodal(Scripted(boost=50.0), b, jax.random.key(0),
                                              blocks=BLOCKS, max_new_tokens=16,
                                              max_len=64))(batch)
  for r, text in enumerate(['Draw the digit 7.', 'x']):
    ids = np.asarray(out.tokens_BxN[r]).tolist()
    pieces, ok = split_pieces(ids, BLOCKS)
    images = [p.codes for p in pieces if p.kind == 'image']
    assert ok and len(images) == 2
    record = {'segments': [{'kind': 'text', 'text': text, 'predict': False}]
              + [{'kind': 'image_code', 'codes': c} for c in images]}
    full = builder.build(record)
    n = len(full['tokens']) - 2 * BLOCKS.block_length
    want = full['positions'][n:]
    np.testing.assert_array_equal(full['tokens'][n:], ids[:2 * BLOCKS.block_length])
    np.testing.assert_array_equal(np.asarray(out.positions_BxNx3[r, :len(want)]), want)
    np.testing.assert_array_equal(np.asarray(out.modality_BxN[r, :len(want)]),
                                  full['modality'][n:])
    assert (full['modality'][n:] == IMAGE_CODE).sum() == 2 * BLOCKS.num_tokens


def _cfg_batch(texts):
  cond, _ = prompt_batch(texts)
  uncond = [unconditional_prompt({'segments': [{'kind': 'text', 'text': t}]}) for t in texts]
  builder = SequenceBuilder(TOK, add_eos=False)
  exs = [builder.build(u) for u in uncond]
  both = collate([*_rows(cond), *exs], 32, {}, pad_id=LAYOUT.pad)
  return cond, both


def _rows(batch):
  """Unbatches a collated batch (real tokens only) back into examples."""
  out = []
  for r in range(batch['tokens'].shape[0]):
    n = int((batch['segment_ids'][r] > 0).sum())
    out.append({k: batch[k][r, :n] for k in ('tokens', 'modality', 'positions', 'block_ids',
                                             'targets', 'loss_weights')}
               | {k: batch[k][r][:0] for k in batch if k.endswith(('_patches', '_slots'))})
  return out


@jax.jit
def _guided(both, rng, scale):
  return generate_multimodal(Scripted(), both, rng, blocks=BLOCKS, max_new_tokens=24,
                             max_len=64, sampling=decode.SamplingConfig(temperature=1.0),
                             guidance_scale=scale)


def test_guidance_scale_one_equals_plain_conditional_sampling():
  texts = ['Draw the digit 7.', 'Draw a 1', 'two', 'Draw the digit three.']
  cond, both = _cfg_batch(texts)
  rng = jax.random.key(11)
  plain = jax.jit(lambda b, r: generate_multimodal(
      Scripted(), b, r, blocks=BLOCKS, max_new_tokens=24, max_len=64,
      sampling=decode.SamplingConfig(temperature=1.0)))(cond, rng)
  one = _guided(both, rng, 1.0)
  np.testing.assert_array_equal(np.asarray(one.tokens_BxN), np.asarray(plain.tokens_BxN))
  assert np.isin(np.asarray(plain.tokens_BxN), [LAYOUT.begin_image]).any()
  # A larger scale changes the codes (the unconditional rows see other
  # prompts) but never the grammar.
  three = _guided(both, rng, 3.0)
  assert not np.array_equal(np.asarray(three.tokens_BxN), np.asarray(plain.tokens_BxN))
  for row in np.asarray(three.tokens_BxN):
    assert split_pieces(row.tolist(), BLOCKS)[1]


SMALL = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4', 'model.num_kv_heads=2',
         'model.head_dim=8', 'model.mlp_dim=64', f'model.vocab_size={V}',
         'model.video_patch_dim=0']


@pytest.fixture(scope='module')
def generator():
  cfg = load_config(None, SMALL)
  model = decoder_spec(cfg.model).build(nnx.Rngs(0))
  builder = SequenceBuilder(TOK, image_codes=FakeCodes())
  return Generator(decode.Sampler(model), PromptEncoder(builder))


def test_generator_returns_text_and_decoded_images_with_guidance(generator):
  prompts = [{'segments': [{'kind': 'text', 'text': 'Draw the digit 7.'}]},
             {'segments': [{'kind': 'text', 'text': 'Draw.'}]}]
  plain = generator.generate_multimodal(prompts, max_new_tokens=20)
  one = generator.generate_multimodal(prompts, max_new_tokens=20, guidance_scale=1.0)
  assert [a.tokens for a in one] == [a.tokens for a in plain]
  guided = generator.generate_multimodal(prompts, max_new_tokens=20, guidance_scale=4.0)
  for a in plain + guided:
    assert a.well_formed
    for img, codes in zip(a.images, a.codes):
      assert img.shape == GRID + (1,) and codes.shape == GRID
  assert unconditional_prompt(prompts[0])['segments'] == [
      {'kind': 'text', 'text': '', 'predict': False}]


def test_a_model_without_image_codes_cannot_be_asked_for_images():
  from gemjax.errors import BadInputError
  cfg = load_config(None, SMALL)
  model = decoder_spec(cfg.model).build(nnx.Rngs(0))
  gen = Generator(decode.Sampler(model), PromptEncoder(SequenceBuilder(ByteTokenizer())))
  with pytest.raises(BadInputError, match='image_codes'):
    gen.generate_multimodal([{'segments': [{'kind': 'text', 'text': 'Draw'}]}])


def test_drawing_eval_scores_known_images_with_the_independent_classifier(monkeypatch, tmp_path):
  """evaluate_tasks on draw_digit: generation replaced by real test digits the
  classifier reads correctly, one per batch of the wrong digit."""
  import re

  from gemjax.eval import tasks as tasks_lib
  from gemjax.eval.digits import default_classifier, load_digits
  from gemjax.inference.generator import MultimodalAnswer
  from gemjax.parallel import sharding as shd
  from gemjax.train import state as st
  path = 'data/sample/test/draw_digit-*'
  cfg = load_config('configs/nano.yaml', SMALL[:-2] + [
      'model.vocab_size=1280', 'data.eval_datasets=[]', f'data.datasets=[{{path: "{path}"}}]'])
  mdef = st.model_def(cfg.model)
  mesh = shd.single_device_mesh()
  params = st.init_state(cfg.model, mdef, st.optimizer_for(cfg), mesh, 0)['params']
  clf = default_classifier()
  x, y = load_digits('data/sample/test/image_digit-*')
  good = clf.predict(x) == y
  by_digit = {d: x[good & (y == d)][0] for d in range(10)}
  asked = []

  def known(self, prompts, **kw):
    out = []
    for k, p in enumerate(prompts):
      d = int(re.search(r'(\d)', p['segments'][0]['text']).group(1))
      asked.append(d)
      shown = (d + 1) % 10 if k == 1 else d     # one wrong drawing per batch
      img = by_digit[shown][..., None]
      out.append(MultimodalAnswer('', [('image', img)], [img], [np.zeros((7, 7), np.int32)],
                                  [], True, k != 2))          # one malformed per batch
    return out

  monkeypatch.setattr(Generator, 'generate_multimodal', known)
  got = tasks_lib.evaluate_tasks(cfg, params, mdef, mesh, cfg.data.datasets, batch_size=4,
                                 max_records=6, out_dir=str(tmp_path))['draw_digit']
  d = got['drawing']
  # The last batch is filled to 4 prompts with copies of its first (one
  # compiled shape); their answers are dropped.
  assert len(asked) == 8 and asked[6:] == [asked[4]] * 2 and d['records'] == 6
  assert d['drawn_as_requested'] == pytest.approx(4 / 6)     # batches of 4 and 2
  assert d['well_formed'] == pytest.approx(5 / 6)
  assert os.path.isfile(got['drawing_grid'])
