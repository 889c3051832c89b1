"""Next-token loss over the one vocabulary: cross-entropy + z-loss, in float32.

Also the per-modality view (loss and accuracy grouped by the modality of the
token being predicted): modalities of different entropy compete, and watching
them separately is how a Chameleon-style divergence is caught early.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from gemjax.batch import MODALITY_NAMES


@jax.custom_vjp
def _logsumexp(logits_NxV: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(logits_NxV, axis=-1)


def _logsumexp_fwd(logits):
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse, (logits, lse)


def _logsumexp_bwd(res, g):
  # softmax = exp(logits - lse), formed once in the backward pass instead of
  # keeping exp(logits - max) of the whole [tokens, vocab] array from the forward.
  logits, lse = res
  return (g[..., None] * jnp.exp(logits - lse[..., None]),)


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def cross_entropy(logits_BxTxV: jax.Array, batch: Mapping[str, jax.Array], *,
                  z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean loss and metrics (sums, so they add across steps/devices)."""
  B, T, V = logits_BxTxV.shape
  # Work on [tokens, vocab]: the vocab-sized passes parallelise over all tokens.
  logits = logits_BxTxV.astype(jnp.float32).reshape(B * T, V)
  targets, weights = batch['targets'], batch['loss_weights'].astype(jnp.float32)
  lse_BxT = _logsumexp(logits).reshape(B, T)
  target_logit_BxT = jnp.take_along_axis(
      logits, targets.reshape(B * T, 1), axis=-1).reshape(B, T)
  max_BxT = jax.lax.stop_gradient(jnp.max(logits, axis=-1)).reshape(B, T)
  nll_BxT = lse_BxT - target_logit_BxT
  z_BxT = z_loss * jnp.square(lse_BxT)
  denom = jnp.maximum(weights.sum(), 1e-8)
  nll = (nll_BxT * weights).sum() / denom
  zl = (z_BxT * weights).sum() / denom
  # Correct when the target's logit is the maximum (ties count as correct; no
  # separate argmax pass over the vocabulary).
  correct_BxT = (jax.lax.stop_gradient(target_logit_BxT) >= max_BxT).astype(jnp.float32)
  # The modality of the predicted token is that of the next token. Under a
  # context layout T is permuted, so the next position in the array is not
  # the next token: the layout hook then supplies it, fixed before permuting.
  target_modality = batch.get('target_modality')
  if target_modality is None:
    target_modality = jnp.roll(batch['modality'], -1, axis=1)
  metrics = {
      'nll': nll, 'z_loss': zl, 'weight_sum': weights.sum(),
      'accuracy': (correct_BxT * weights).sum() / denom,
      'logit_norm': (jnp.sqrt(jnp.mean(jnp.square(logits), axis=-1)).reshape(B, T)
                     * weights).sum() / denom,
  }
  for m, name in enumerate(MODALITY_NAMES):
    w = weights * (target_modality == m)
    metrics[f'weight_sum/{name}'] = w.sum()
    metrics[f'nll_sum/{name}'] = (nll_BxT * w).sum()
    metrics[f'correct_sum/{name}'] = (correct_BxT * w).sum()
  return nll + zl, metrics
