"""The fine-tuning recipe: a pretrained-format text LLM (a small Llama with a
BPE tokenizer.json, built here) imported with gemjax.convert, grown into the
multimodal model of configs/finetune-multimodal.yaml, trained two steps on
the sample corpus on an 8-device fsdp mesh."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

from gemjax import convert
from gemjax.config import load_config
from gemjax.data import registry
from gemjax.train.loop import Trainer
from support import sample_text

tk = pytest.importorskip('tokenizers')
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pretrained(hf_dir: str) -> int:
  """A byte-level BPE tokenizer.json and a Llama of its vocabulary; returns V."""
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  tok.train_from_iterator(sample_text(), tk.trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<s>', '</s>'],
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  os.makedirs(hf_dir)
  tok.save(os.path.join(hf_dir, 'tokenizer.json'))
  V = tok.get_vocab_size()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(hf_dir)
  return V


@pytest.mark.slow
def test_one_finetuning_step_trains_only_the_new_parts_first(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)   # the preset's data paths are relative to the repository
  hf_dir, run_dir = str(tmp_path / 'hf'), str(tmp_path / 'llm')
  V = _pretrained(hf_dir)
  convert.import_hf(hf_dir, run_dir)
  path = convert.finetune_config(run_dir, 'configs/finetune-multimodal.yaml')
  cfg = load_config(path, [
      'train.steps=2', 'train.batch_size=8', 'train.seq_len=128', 'mesh.data=1',
      'mesh.fsdp=8', f'train.run_dir={tmp_path / "ft"}', 'train.progress_bar=false',
      'train.tensorboard=false', 'checkpoint.freeze_loaded_steps=2', 'eval.every=0'])
  size = registry.text_tokenizer(cfg).layout.size
  assert cfg.model.vocab_size == -(-size // 128) * 128 and size > V
  assert cfg.data.tokenizer.endswith('tokenizer.json')

  trainer = Trainer.create(cfg)
  assert dict(trainer.mesh.shape)['fsdp'] == 8
  before = jax.tree.map(np.asarray, trainer.state['params'])
  # Loaded exactly; new rows start at the mean of the pretrained rows plus
  # their fresh N(0, init_std) values.
  from safetensors import safe_open
  with safe_open(os.path.join(hf_dir, 'model.safetensors'), framework='np') as f:
    np.testing.assert_array_equal(before['embedding_VxD'][:V], f.get_tensor(
        'model.embed_tokens.weight'))
  offset = before['embedding_VxD'][V:] - before['embedding_VxD'][:V].mean(0)
  assert abs(offset.std() - cfg.model.init_std) < 0.3 * cfg.model.init_std

  assert trainer.run() == 0
  trainer.checkpointer.close()
  after = jax.tree.map(np.asarray, trainer.state['params'])
  emb0, emb1 = before['embedding_VxD'], after['embedding_VxD']
  # Frozen for these first steps (the first has learning rate 0, warm-up):
  # the pretrained rows, layers, norms.
  np.testing.assert_array_equal(emb1[:V], emb0[:V])
  for x, y in zip(jax.tree.leaves(before['layers']), jax.tree.leaves(after['layers'])):
    np.testing.assert_array_equal(x, y)
  # Trained: the new vocabulary rows the batch used and the patch embedders.
  assert np.any(emb1[V:size] != emb0[V:size])
  for m in ('image', 'audio'):
    proj0 = before['inputs']['encoders'][m]['proj_PxD']
    proj1 = after['inputs']['encoders'][m]['proj_PxD']
    assert np.any(proj1 != proj0), f'the {m} patch embedder did not train'
