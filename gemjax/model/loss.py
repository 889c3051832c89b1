"""Next-token loss over the one vocabulary: cross-entropy + z-loss, in float32.

Also the per-modality view (loss and accuracy grouped by the modality of the
token being predicted): modalities of different entropy compete, and watching
them separately is how a Chameleon-style divergence is caught early.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from gemjax.data.batch import MODALITY_NAMES


def cross_entropy(logits_BxTxV: jax.Array, batch: Mapping[str, jax.Array], *,
                  z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean loss and metrics (sums, so they add across steps/devices)."""
  logits = logits_BxTxV.astype(jnp.float32)
  targets, weights = batch['targets'], batch['loss_weights'].astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll_BxT = lse_BxT - target_logit_BxT
  z_BxT = z_loss * jnp.square(lse_BxT)
  denom = jnp.maximum(weights.sum(), 1e-8)
  nll = (nll_BxT * weights).sum() / denom
  zl = (z_BxT * weights).sum() / denom
  correct_BxT = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  # The modality of the predicted token is that of the next position.
  target_modality = jnp.roll(batch['modality'], -1, axis=1)
  metrics = {
      'nll': nll, 'z_loss': zl, 'weight_sum': weights.sum(),
      'accuracy': (correct_BxT * weights).sum() / denom,
      'logit_norm': (jnp.sqrt(jnp.mean(jnp.square(logits), axis=-1)) * weights).sum() / denom,
  }
  for m, name in enumerate(MODALITY_NAMES):
    w = weights * (target_modality == m)
    metrics[f'weight_sum/{name}'] = w.sum()
    metrics[f'nll_sum/{name}'] = (nll_BxT * w).sum()
    metrics[f'correct_sum/{name}'] = (correct_BxT * w).sum()
  return nll + zl, metrics
