"""FLOPs per token (for MFU) against hand counts."""

from gemjax.config import load_config
from gemjax.model import flops
from gemjax.model.spec import decoder_spec

TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=64', 'train.seq_len=64']
H, K, L = 4, 8, 2


def test_infini_attention_flops_count_one_segment_not_the_row():
  spec = decoder_spec(load_config(None, TINY + ['model.attention=infini',
                                                'model.infini.segment_len=16']).model)
  # Softmax attention inside a 16-token segment: 12 * H * K FLOPs per key, 16 keys.
  assert flops.attention_flops_per_token(spec, 64) == L * 12 * H * K * 16
  # A row shorter than a segment is one segment.
  assert flops.attention_flops_per_token(spec, 8) == L * 12 * H * K * 8


def test_attention_flops_global_and_sliding_window_layers():
  dense = decoder_spec(load_config(None, TINY).model)
  assert flops.attention_flops_per_token(dense, 64) == L * 12 * H * K * 64
  local = decoder_spec(load_config(None, TINY + ['model.local_layers=1',
                                                 'model.window=8']).model)
  # one sliding-window layer (8 keys) + one global layer (64 keys)
  assert flops.attention_flops_per_token(local, 64) == 12 * H * K * (8 + 64)
  infini_local = decoder_spec(load_config(None, TINY + [
      'model.attention=infini', 'model.infini.segment_len=16', 'model.local_layers=1',
      'model.window=8']).model)
  assert flops.attention_flops_per_token(infini_local, 64) == 12 * H * K * (8 + 16)
