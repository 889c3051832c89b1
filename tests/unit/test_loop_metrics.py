"""Logged metrics are window means, not the last step's noisy value."""

import jax.numpy as jnp
import numpy as np

from gemjax.train import loop, metrics as metrics_lib


def test_window_mean_averages_steps_and_keeps_token_weighted_ratios():
  steps = [
      {'loss': jnp.float32(2.0), 'learning_rate': jnp.float32(1e-3), 'finite': jnp.bool_(True),
       'nll_sum/text': jnp.float32(6.0), 'correct_sum/text': jnp.float32(1.0),
       'weight_sum/text': jnp.float32(3.0)},
      {'loss': jnp.float32(4.0), 'learning_rate': jnp.float32(2e-3), 'finite': jnp.bool_(True),
       'nll_sum/text': jnp.float32(2.0), 'correct_sum/text': jnp.float32(0.0),
       'weight_sum/text': jnp.float32(1.0)},
  ]
  total = None
  for m in steps:
    total = loop._accumulate(total, m)
  out = metrics_lib.summarize(loop._window_mean(total, steps[-1], len(steps)))
  assert out['loss'] == 3.0                       # mean of the two steps
  assert np.isclose(out['learning_rate'], 2e-3)   # the current rate, not a mean
  assert out['loss/text'] == 2.0                  # (6 + 2) / (3 + 1) tokens
  assert out['accuracy/text'] == 0.25


def test_tokens_per_s_counts_real_tokens_not_padding():
  from gemjax.train import state as S
  # Two steps of a [2, 8] batch; 5 + 8 and then 3 + 0 real tokens (segment id > 0).
  seg1 = np.array([[1, 1, 2, 2, 2, 0, 0, 0], [1] * 8], np.int32)
  seg2 = np.array([[3, 3, 3, 0, 0, 0, 0, 0], [0] * 8], np.int32)
  total = None
  for seg in (seg1, seg2):
    m = {'loss': jnp.float32(1.0), 'tokens_sum': S.count_tokens({'segment_ids': jnp.asarray(seg)})}
    total = loop._accumulate(total, m)
  window = loop._window_mean(total, m, 2)
  out = loop.throughput(window, steps=2, elapsed=4.0, batch_size=2, seq_len=8)
  assert out['step_time_s'] == 2.0
  assert out['tokens_per_s'] == (13 + 3) / 4.0          # real tokens over the window
  assert out['padded_tokens_per_s'] == 2 * 8 / 2.0      # every slot, per step time
