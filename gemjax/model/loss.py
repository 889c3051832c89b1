"""Next-token loss over the one vocabulary: cross-entropy + z-loss, in float32.

Also the per-modality view (loss and accuracy grouped by the modality of the
token being predicted): modalities of different entropy compete, and watching
them separately is how a Chameleon-style divergence is caught early.
"""

from __future__ import annotations

from typing import Callable, Mapping

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


def _target_modality(batch: Mapping[str, jax.Array]) -> jax.Array:
  """The modality of the token each position predicts: that of the next token.
  Under a context layout T is permuted, so the next position in the array is
  not the next token: the layout hook then supplies it, fixed before permuting."""
  target_modality = batch.get('target_modality')
  if target_modality is None:
    target_modality = jnp.roll(batch['modality'], -1, axis=1)
  return target_modality


def _sums(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
          target_modality_BxT: jax.Array, z_loss: float) -> dict[str, jax.Array]:
  """Weighted sums of the loss terms and metrics over some tokens."""
  B, T, V = logits_BxTxV.shape
  # Work on [tokens, vocab]: the vocab-sized passes parallelise over all tokens.
  logits = logits_BxTxV.astype(jnp.float32).reshape(B * T, V)
  lse_BxT = _logsumexp(logits).reshape(B, T)
  target_logit_BxT = jnp.take_along_axis(
      logits, targets_BxT.reshape(B * T, 1), axis=-1).reshape(B, T)
  max_BxT = jax.lax.stop_gradient(jnp.max(logits, axis=-1)).reshape(B, T)
  nll_BxT = lse_BxT - target_logit_BxT
  # Correct when the target's logit is the maximum (ties count as correct; no
  # separate argmax pass over the vocabulary).
  correct_BxT = (jax.lax.stop_gradient(target_logit_BxT) >= max_BxT).astype(jnp.float32)
  w = weights_BxT
  out = {
      'nll_sum': (nll_BxT * w).sum(),
      'z_sum': (z_loss * jnp.square(lse_BxT) * w).sum(),
      'weight_sum': w.sum(),
      'correct_sum': (correct_BxT * w).sum(),
      'logit_norm_sum': (jnp.sqrt(jnp.mean(jnp.square(logits), axis=-1)).reshape(B, T)
                         * w).sum(),
  }
  for m, name in enumerate(MODALITY_NAMES):
    wm = w * (target_modality_BxT == m)
    out[f'weight_sum/{name}'] = wm.sum()
    out[f'nll_sum/{name}'] = (nll_BxT * wm).sum()
    out[f'correct_sum/{name}'] = (correct_BxT * wm).sum()
  return out


def _finalize(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  denom = jnp.maximum(sums['weight_sum'], 1e-8)
  nll, zl = sums['nll_sum'] / denom, sums['z_sum'] / denom
  metrics = {'nll': nll, 'z_loss': zl, 'weight_sum': sums['weight_sum'],
             'accuracy': sums['correct_sum'] / denom,
             'logit_norm': sums['logit_norm_sum'] / denom}
  metrics.update({k: v for k, v in sums.items() if '/' in k})
  return nll + zl, metrics


def cross_entropy(logits_BxTxV: jax.Array, batch: Mapping[str, jax.Array], *,
                  z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean loss and metrics (sums, so they add across steps/devices)."""
  return _finalize(_sums(logits_BxTxV, batch['targets'],
                         batch['loss_weights'].astype(jnp.float32),
                         _target_modality(batch), z_loss))


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], x_BxTxD: jax.Array,
                          batch: Mapping[str, jax.Array], *, z_loss: float,
                          chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`cross_entropy(logits_fn(x), batch)` without ever holding all the logits.

  The row is cut into chunks of `chunk` tokens; a scan computes each chunk's
  logits (`logits_fn`, the output head), folds its sums in, and drops them.
  The body is rematerialised, so the backward pass recomputes one chunk's
  logits at a time too: [B, chunk, V] instead of [B, T, V] live, for one
  extra head matmul. Same values as `cross_entropy` up to summation order.
  """
  B, T, D = x_BxTxD.shape
  if T % chunk:
    raise ValueError(f'loss chunk {chunk} must divide the sequence length {T}')
  n = T // chunk

  def split(a):   # [B, T, ...] -> [n, B, chunk, ...]
    return jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(carry, xs):
    x_c, t_c, w_c, m_c = xs
    part = _sums(logits_fn(x_c), t_c, w_c, m_c, z_loss)
    return jax.tree.map(jnp.add, carry, part), None

  weights = batch['loss_weights'].astype(jnp.float32)
  shapes = jax.eval_shape(
      lambda: _sums(jnp.zeros((B, 1, 1), jnp.float32), jnp.zeros((B, 1), jnp.int32),
                    jnp.zeros((B, 1), jnp.float32), jnp.zeros((B, 1), jnp.int8), z_loss))
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  sums, _ = jax.lax.scan(body, zero, (split(x_BxTxD), split(batch['targets']), split(weights),
                                      split(_target_modality(batch))))
  return _finalize(sums)
