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
