"""Generation from records: multimodal prompts, positions, the Generator, the CLI, bad prompts."""

import io
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from gemjax.config import load_config
from gemjax.data.sequence import SequenceBuilder, collate
from gemjax.errors import BadInputError
from gemjax.inference import cli, decode
from gemjax.inference.generator import Generator, generate
from gemjax.inference.prompts import PromptEncoder, split_answer
from gemjax.model.spec import decoder_spec
from gemjax.tokenizers.text import ByteTokenizer


SMALL = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4', 'model.num_kv_heads=2',
         'model.head_dim=8', 'model.mlp_dim=64', 'model.vocab_size=272',
         'model.video_patch_dim=0']


def png_bytes(h=28, w=28, seed=0) -> bytes:
  buf = io.BytesIO()
  px = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(px).save(buf, 'PNG')
  return buf.getvalue()


def wav_bytes(seconds=0.3, sr=16000) -> bytes:
  import soundfile as sf
  t = np.arange(int(seconds * sr)) / sr
  buf = io.BytesIO()
  sf.write(buf, 0.3 * np.sin(2 * np.pi * 300 * t), sr, format='WAV')
  return buf.getvalue()


RECORD = {'segments': [
    {'kind': 'image', 'data': png_bytes()},
    {'kind': 'audio', 'data': wav_bytes()},
    {'kind': 'text', 'text': 'Same?', 'predict': False},
    {'kind': 'text', 'text': 'yes, seven', 'predict': True}]}


@pytest.mark.parametrize('encoder_layers', [0, 1], ids=['early_fusion', 'late_fusion'])
def test_multimodal_prompt_continues_positions_and_logits_of_the_full_record(encoder_layers):
  cfg = load_config(None, SMALL + [f'model.encoder_layers={encoder_layers}'])
  model = decoder_spec(cfg.model).build(nnx.Rngs(1))
  builder = SequenceBuilder(ByteTokenizer())
  full = builder.build(RECORD)
  prompt_rec, answer = split_answer(RECORD)
  assert [s['text'] for s in answer] == ['yes, seven']
  enc = PromptEncoder(builder)
  prompt = enc.example(prompt_rec)
  n = len(prompt['tokens'])
  np.testing.assert_array_equal(prompt['tokens'], full['tokens'][:n])
  np.testing.assert_array_equal(prompt['positions'], full['positions'][:n])
  # The image and audio blocks moved the text positions off the token index.
  assert full['positions'][n, 0] != n

  T = 64
  budgets = {'image': 16, 'audio': 16}
  full_batch = collate([full], T, budgets, pad_id=builder.layout.pad)
  graphdef, state = nnx.split(model)
  want = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b)[0])(state, full_batch)
  prompt_batch = collate([prompt], 32, budgets, pad_id=builder.layout.pad)
  sampler = decode.Sampler(graphdef=graphdef, params=state)
  logits, cache, dstate = sampler.prefill(prompt_batch, T)
  np.testing.assert_allclose(logits[0], want[0, n - 1], atol=1e-4)
  steps = len(full['tokens']) - n - 1
  for i in range(steps):
    # The next token's position is the one the sequence builder gave it.
    np.testing.assert_array_equal(int(dstate.position_B[0]), full['positions'][n + i])
    assert int(dstate.index_B[0]) == n + i
    tok = jax.numpy.asarray([full['tokens'][n + i]], jax.numpy.int32)
    logits, cache, dstate = sampler.step(tok, dstate, cache)
    np.testing.assert_allclose(logits[0], want[0, n + i], atol=1e-4, err_msg=f'step {i}')


def _generator(extra=(), seed=0):
  cfg = load_config(None, SMALL + list(extra))
  model = decoder_spec(cfg.model).build(nnx.Rngs(seed))
  return model, SequenceBuilder(ByteTokenizer())


def test_generate_records_batch_equals_each_alone_and_stops_at_eos():
  model, builder = _generator(seed=2)
  prompts = [split_answer(RECORD)[0], {'segments': [{'kind': 'text', 'text': 'Hello there'}]}]
  both = generate(model, prompts, max_new_tokens=10, builder=builder)
  for i, p in enumerate(prompts):
    [alone] = generate(model, [p], max_new_tokens=10, builder=builder)
    assert alone.tokens == both[i].tokens
  # With the first generated token as the stop token, every answer is empty.
  stop = both[1].tokens[0]
  [ans] = generate(model, [prompts[1]], max_new_tokens=10, builder=builder, stop_tokens=[stop])
  assert ans.tokens == [stop] and ans.stopped and ans.text == ''


def test_prompt_lengths_share_bucketed_shapes_and_one_compiled_loop():
  from gemjax.inference.prompts import bucket
  assert [bucket(n, 16) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]
  assert bucket(5, 8) == 8 and bucket(57, 8) == 64
  model, builder = _generator(seed=2)
  enc = PromptEncoder(builder)
  short, longer = ({'segments': [{'kind': 'text', 'text': t}]} for t in ('x' * 34, 'x' * 58))
  (b1, n1), (b2, n2) = (enc.collate([enc.example(p)]) for p in (short, longer))
  assert 32 < n1[0] < 48 < n2[0] <= 64       # multiples of 16 would give 48 and 64
  assert b1['tokens'].shape == b2['tokens'].shape == (1, 64)
  gen = Generator(decode.Sampler(model), enc)
  for p in (short, longer):
    gen.generate([p], max_new_tokens=4)
  # One jitted loop, traced once: both prompts and their caches had one shape.
  [fn] = gen.sampler._fns.values()
  assert fn._cache_size() == 1


def test_bad_prompts_give_clear_errors(tmp_path):
  model, builder = _generator()
  missing = tmp_path / 'nope.png'
  with pytest.raises(BadInputError, match='nope.png'):
    generate(model, [{'segments': [{'kind': 'image', 'data': str(missing)}]}],
             builder=builder)
  corrupt = tmp_path / 'corrupt.png'
  corrupt.write_bytes(b'\x89PNG\r\n\x1a\nthis is not an image')
  with pytest.raises(BadInputError, match=r'prompt 0:segments\[0\]'):
    generate(model, [{'segments': [{'kind': 'image', 'data': str(corrupt)}]}],
             builder=builder)
  with pytest.raises(BadInputError, match='max_len=16'):
    generate(model, [{'segments': [{'kind': 'text', 'text': 'x' * 40}]}], builder=builder,
             max_new_tokens=4, max_len=16)
  with pytest.raises(BadInputError, match="'segments'"):
    generate(model, [{'text': 'no segments'}], builder=builder)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  from gemjax.train.loop import Trainer
  run = tmp_path_factory.mktemp('gen') / 'run'
  cfg = load_config(None, SMALL + [
      'train.batch_size=8', 'train.seq_len=32', 'train.steps=2', 'train.log_every=1',
      'train.progress_bar=false', 'train.tensorboard=false', 'checkpoint.every=2',
      'optimizer.warmup_steps=1', f'train.run_dir={run}'])
  trainer = Trainer.create(cfg)
  assert trainer.run() == 0
  trainer.checkpointer.close()
  return run


def test_cli_streams_an_answer_and_answers_a_jsonl_batch(trained_run, tmp_path, capsys):
  img = tmp_path / 'digit.png'
  img.write_bytes(png_bytes())
  assert cli.main([str(trained_run), '--prompt', 'Which digit?', '--image', str(img),
                   '--max-new-tokens', '5']) == 0
  streamed = capsys.readouterr().out
  gen = Generator.from_checkpoint(str(trained_run))
  [want] = gen.generate([cli.record_of('Which digit?', [str(img)])], max_new_tokens=5)
  assert streamed == want.text + '\n'
  lines = tmp_path / 'prompts.jsonl'
  lines.write_text(json.dumps({'prompt': 'Which digit?', 'image': str(img)}) + '\n'
                   + json.dumps({'segments': [{'kind': 'text', 'text': 'abc'}]}) + '\n')
  assert cli.main([str(trained_run), '--jsonl', str(lines), '--max-new-tokens', '5',
                   '--batch-size', '2']) == 0
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [r['index'] for r in rows] == [0, 1] and rows[0]['answer'] == want.text
  assert rows[0]['tokens'] == want.tokens


def test_cli_bad_input_exits_2_naming_the_problem(trained_run, tmp_path, capsys):
  assert cli.main([str(trained_run), '--prompt', 'x', '--image', str(tmp_path / 'gone.png')]) == 2
  assert 'gone.png' in capsys.readouterr().err
  assert cli.main([str(trained_run), '--prompt', 'y' * 50, '--max-len', '16']) == 2
  assert 'max_len=16' in capsys.readouterr().err
  assert cli.main([str(tmp_path / 'no_run_here'), '--prompt', 'x']) == 2
  assert 'no_run_here' in capsys.readouterr().err
  assert os.path.isdir(trained_run)   # nothing was touched


def test_task_eval_by_generation_scores_known_answers(monkeypatch):
  from gemjax.eval import tasks as tasks_lib
  from gemjax.eval.tasks import iter_records
  from gemjax.data.registry import sequence_builder
  from gemjax.parallel import sharding as shd
  from gemjax.train import state as st
  path = 'data/sample/test/image_digit-*'
  cfg = load_config('configs/nano.yaml', SMALL + [
      'model.vocab_size=272', 'model.video_patch_dim=588', 'data.eval_datasets=[]',
      "data.image_codes=''",   # text answers only: no image-code range in the vocabulary
      f'data.datasets=[{{path: "{path}"}}]'])
  mdef = st.model_def(cfg.model)
  mesh = shd.single_device_mesh()
  params = st.init_state(cfg.model, mdef, st.optimizer_for(cfg), mesh, 0)['params']
  # The answers, built independently: prompt -> answer tokens + eos.
  builder = sequence_builder(cfg)
  enc = PromptEncoder(builder)
  answers = {}
  for i, (where, rec) in enumerate(iter_records(path)):
    if i == 6:
      break
    prompt = enc.example(split_answer(rec)[0])
    n = len(prompt['tokens'])
    full = builder.build(rec)['tokens']
    # Keyed by the pixels too: every digit prompt has the same tokens.
    answers[prompt['image_patches'].tobytes()] = full[n:]
  assert all(a[-1] == builder.layout.eos for a in answers.values())
  real = tasks_lib.evaluate_tasks(cfg, params, mdef, mesh, cfg.data.datasets, batch_size=4,
                                  max_records=6)['image_digit']
  assert real['generated_records'] == 6 and 0 <= real['generated_exact_match'] <= 1

  def known(self, examples, *, max_new_tokens, stop_tokens, **kw):
    rows = []
    for k, ex in enumerate(examples):
      want = list(answers[ex['image_patches'].tobytes()])
      if k == 1:                      # one wrong answer per batch of 4
        want[0] = (want[0] + 1) % 256
      rows.append((want + [builder.layout.pad] * max_new_tokens)[:max_new_tokens])
    return decode.Generation(np.asarray(rows), None, None)

  monkeypatch.setattr(Generator, 'generate_ids', known)
  got = tasks_lib.evaluate_tasks(cfg, params, mdef, mesh, cfg.data.datasets, batch_size=4,
                                 max_records=6)['image_digit']
  # Batches of 4 and 2 records: one wrong in each.
  assert got['generated_records'] == 6 and got['generated_exact_match'] == pytest.approx(4 / 6)


def test_cli_out_writes_generated_images_and_prints_their_paths(trained_run, tmp_path, capsys,
                                                                 monkeypatch):
  from gemjax.inference.generator import MultimodalAnswer
  img = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
  calls = []

  def drawn(self, prompts, **kw):
    calls.append(kw['guidance_scale'])
    return [MultimodalAnswer('7', [('image', img), ('text', '7')], [img],
                             [np.zeros((7, 7), np.int32)], [1, 2], True, True)] * len(prompts)

  monkeypatch.setattr(Generator, 'generate_multimodal', drawn)
  out = tmp_path / 'drawn'
  assert cli.main([str(trained_run), '--prompt', 'Draw a digit, then name it.',
                   '--out', str(out), '--guidance', '2.5']) == 0
  assert capsys.readouterr().out == f'[image: {out}/0-0.png]7\n' and calls == [2.5]
  np.testing.assert_array_equal(np.asarray(Image.open(out / '0-0.png')), img[..., 0])
  assert cli.main([str(trained_run), '--prompt', 'Draw.', '--guidance', '2']) == 2
  assert '--out' in capsys.readouterr().err


def test_training_logs_mfu_over_the_full_square_and_the_causal_half(trained_run):
  import json
  rows = [json.loads(l) for l in open(trained_run / 'metrics.jsonl')]
  logged = [r for r in rows if 'mfu' in r]
  assert logged
  for r in logged:
    # Causal layers: the half count drops part of the attention FLOPs only.
    assert 0 < r['mfu_causal'] < r['mfu'] < 1.5 * r['mfu_causal']
