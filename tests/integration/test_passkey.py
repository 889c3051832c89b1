"""Passkey generator (batch contract, needle depth, loss on the answer only) and
the depth x length evaluation (exact match, Markdown table, heat map)."""

import os

import numpy as np
import pytest

from gemjax.config import ModelConfig, OptimizerConfig
from gemjax.data import passkey as pk
from gemjax.batch import validate_batch
from gemjax.eval import passkey as pk_eval
from gemjax.parallel import sharding as shd
from gemjax.train import state as st


@pytest.mark.parametrize('depth', [0.0, 0.5, 1.0])
def test_example_has_exact_length_and_needle_at_depth(depth):
  ex = pk.make_example(400, depth, 4217, digits=5)
  assert len(ex.text) == 400
  assert ex.text.endswith(pk.QUESTION + '04217')
  assert ex.text[ex.needle_start:].startswith(pk.needle('04217'))
  filler = 400 - pk.min_length(5)
  assert abs(ex.needle_start - depth * filler) <= len(pk.FILLER)   # snapped to a sentence
  assert ex.text[ex.answer_start:] == '04217'


def test_batch_follows_contract_and_weights_only_answer_digits():
  rng = np.random.default_rng(0)
  batch = pk.passkey_batch(rng, 4, 256, lengths=(150, 256), digits=5)
  validate_batch(batch)
  assert batch['tokens'].max() < 256 and (batch['modality'] == 0).all()
  for b in range(4):
    w = batch['loss_weights'][b]
    assert w.sum() == 5
    answer = bytes(batch['targets'][b][w > 0].astype(np.uint8)).decode()
    assert answer.isdigit() and len(answer) == 5
    n = int((batch['segment_ids'][b] > 0).sum())
    text = bytes(batch['tokens'][b, :n].astype(np.uint8)).decode()
    assert text.endswith(pk.QUESTION + answer) and pk.needle(answer) in text


def test_batches_are_a_pure_function_of_seed_step_row():
  a = pk.passkey_batches(4, 192, seed=3)
  b = pk.passkey_batches(4, 192, seed=3, start_step=1)
  next(a)
  np.testing.assert_array_equal(next(a)['tokens'], next(b)['tokens'])
  rows = pk.passkey_batches(4, 192, seed=3, rows=range(2, 4))
  np.testing.assert_array_equal(next(rows)['tokens'], next(pk.passkey_batches(4, 192, seed=3))['tokens'][2:])


def test_too_short_length_is_a_clear_error():
  with pytest.raises(ValueError, match='too short'):
    pk.make_example(40, 0.5, 1)


@pytest.mark.slow
def test_evaluate_writes_table_and_heatmap(tmp_path):
  cfg = ModelConfig(vocab_size=272, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                    mlp_dim=64, num_layers=1)
  mdef = st.model_def(cfg)
  mesh = shd.single_device_mesh()
  tx = st.make_optimizer(OptimizerConfig(), 1, mdef.groups)
  params = st.init_state(cfg, mdef, tx, mesh, 0)['params']
  res = pk_eval.evaluate_passkey(params, mdef, lengths=(128, 160), depths=(0.0, 1.0),
                                 samples=3, batch_size=2, out_dir=str(tmp_path),
                                 train_length=128)
  grid = res['exact_match']
  assert grid.shape == (2, 2) and ((grid >= 0) & (grid <= 1)).all()
  assert res["generated_exact_match"].shape == (2, 2)
  assert "By greedy generation" in res["markdown"]
  assert '| depth \\ length | 128* | 160 |' in res['markdown']
  assert all(os.path.getsize(f) > 0 for f in res['files'])
  assert res['files'][1].endswith('.png')


@pytest.mark.slow
def test_train_then_eval_py_writes_the_passkey_grid(tmp_path, capsys):
  """The passkey preset through the real CLIs: train.py then eval.py."""
  from gemjax.eval import run as eval_run
  from gemjax.train import loop
  run_dir = str(tmp_path / 'run')
  tiny = ['model.num_layers=1', 'model.d_model=32', 'model.num_heads=2', 'model.num_kv_heads=2',
          'model.head_dim=16', 'model.mlp_dim=64', 'train.seq_len=128', 'train.batch_size=8',
          'train.steps=2', f'train.run_dir={run_dir}', 'train.progress_bar=false',
          'train.tensorboard=false', 'checkpoint.every=2']
  assert loop.main(['configs/passkey.yaml', *tiny]) == 0
  assert eval_run.main(['configs/passkey.yaml', *tiny, 'eval.batches=1',
                        'eval.passkey_lengths=[128,160]', 'eval.passkey_samples=2']) == 0
  out = capsys.readouterr().out
  assert 'passkey exact match' in out and '| depth \\ length | 128* | 160 |' in out
  for name in ('passkey.md', 'passkey.png', 'report.md', 'eval.json'):
    assert os.path.exists(os.path.join(run_dir, 'eval', name)), name


class _Echo:
  """A stand-in sampler that 'generates' what it is told: scoring is checked
  against a constructed known answer, independent of any model."""

  def __init__(self, answer_of):
    self.answer_of, self.prompts = answer_of, []

  def generate(self, prompt, *, max_new_tokens, max_len):
    from gemjax.inference.decode import Generation
    self.prompts.append(prompt)
    toks = np.stack([self.answer_of(prompt, r) for r in range(prompt['tokens'].shape[0])])
    B = toks.shape[0]
    return Generation(toks[:, :max_new_tokens], np.full(B, max_new_tokens), np.zeros(B, bool))


def test_generated_exact_match_scores_a_known_answer_and_cuts_the_prompt_at_the_question():
  rng = np.random.default_rng(1)
  batch = pk.passkey_batch(rng, 3, 200, lengths=(150, 200), digits=5)
  keys = [bytes(batch['targets'][r][batch['loss_weights'][r] > 0].astype(np.uint8)) for r in range(3)]
  right = _Echo(lambda p, r: np.frombuffer(keys[r], np.uint8).astype(np.int32))
  assert pk_eval.generated_exact(right, batch, 200).tolist() == [True, True, True]
  prompt = right.prompts[0]
  for r in range(3):   # the prompt ends with the question, before the key
    n = int((prompt['segment_ids'][r] > 0).sum())
    assert bytes(prompt['tokens'][r, :n].astype(np.uint8)).decode().endswith(pk.QUESTION)
  one_wrong = _Echo(lambda p, r: np.frombuffer(keys[r], np.uint8).astype(np.int32)
                    + (r == 1) * np.array([0, 0, 0, 0, 1]))
  assert pk_eval.generated_exact(one_wrong, batch, 200).tolist() == [True, False, True]


def test_teacher_forced_exact_match_scores_constructed_predictions():
  """The grid's scorer: a row counts only when every answer digit is the
  argmax; wrong predictions outside the answer do not matter."""
  import types
  import jax
  import jax.numpy as jnp
  from flax import nnx

  class Oracle(nnx.Module):
    def __init__(self, V, wrong_row):
      self.unused = nnx.Param(jnp.zeros(()))
      self.V, self.wrong_row = V, wrong_row

    def __call__(self, batch):
      t, on = batch['targets'], batch['loss_weights'] > 0
      first = jnp.cumsum(on, axis=1) == 1
      rows = jnp.arange(t.shape[0])[:, None]
      # Off the answer: always wrong. On it: right, except the first digit of one row.
      pred = jnp.where(on, t, t + 1)
      pred = jnp.where(on & first & (rows == self.wrong_row), t + 1, pred)
      return jax.nn.one_hot(pred % self.V, self.V) * 10.0, None, None

  batch = pk.passkey_batch(np.random.default_rng(3), 4, 160, digits=5)
  for wrong_row, want in ((-1, [True] * 4), (2, [True, True, False, True])):
    graphdef, state = nnx.split(Oracle(272, wrong_row))
    exact, _ = pk_eval._make_forward(types.SimpleNamespace(graphdef=graphdef))(
        state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert np.asarray(exact).tolist() == want
