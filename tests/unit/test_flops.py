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


def test_causal_half_counts_half_the_square_and_half_each_segment():
  dense = decoder_spec(load_config(None, TINY).model)
  T = 64
  full = flops.attention_flops_per_token(dense, T)
  assert flops.attention_flops_per_token(dense, T, causal_half=True) == full / 2
  # Sliding window W: T*W - W^2/2 visible pairs, per query W - W^2/(2T).
  local = decoder_spec(load_config(None, TINY + ['model.local_layers=1',
                                                 'model.window=8']).model)
  assert flops.attention_flops_per_token(local, T, causal_half=True) == \
      12 * H * K * ((8 - 64 / (2 * T)) + T / 2)
  # Infini: the triangle is per segment.
  infini = decoder_spec(load_config(None, TINY + ['model.attention=infini',
                                                  'model.infini.segment_len=16']).model)
  assert flops.attention_flops_per_token(infini, T, causal_half=True) == L * 12 * H * K * 8
  # Parameter FLOPs are not discounted.
  assert (flops.train_flops_per_token(dense, T) - flops.train_flops_per_token(
      dense, T, causal_half=True)) == full / 2
