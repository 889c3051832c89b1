"""Decoding with the KV cache: prefill, one step, sampling, and a jitted generate loop.

    cache = model.init_cache(B, max_len)
    logits_BxV, cache, state = prefill(model, batch, cache)     # the prompts
    token_B = sample(logits_BxV, rng, SamplingConfig(greedy=True))
    logits_BxV, cache, state = step(model, token_B, state, cache)  # one token per row

`batch` is a prompt batch of the batch contract (gemjax/batch.py), built by
`gemjax.inference.prompts` from records: each row its own prompt, of its
own length, left-aligned and padded on the right (segment id 0). Every row
keeps its own `DecodeState`: the next token index (the cache slot; no
left-padding shifts) and the next M-RoPE position, max position so far + 1,
which is what `gemjax/data/sequence.py` gives a text token after the prompt.

`generate_tokens` is the whole loop under one `jax.jit`: prefill, then a
`lax.while_loop` of steps that stops when every row has emitted a stop token
or `max_new_tokens` are out. Imports jax/flax and the model room.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemjax.batch import TEXT


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a token is drawn from the logits.

  greedy: argmax (the rest is ignored). Otherwise softmax(logits / temperature)
  restricted to the `top_k` most likely tokens (0 = all) and to the smallest
  set whose probability reaches `top_p` (1.0 = all), nucleus sampling
  (Holtzman et al. 2020).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f'SamplingConfig.temperature={self.temperature} must be > 0 '
                       f'(or greedy=True)')
    if self.top_k < 0:
      raise ValueError(f'SamplingConfig.top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'SamplingConfig.top_p={self.top_p} must be in (0, 1]')


GREEDY = SamplingConfig(greedy=True)


def sample(logits_BxV: jax.Array, rng: jax.Array, config: SamplingConfig = GREEDY,
           allowed_BxV: jax.Array | None = None) -> jax.Array:
  """One token id per row (int32 [B]); `allowed_BxV` masks tokens out (constraints)."""
  logits = logits_BxV.astype(jnp.float32)
  neg = jnp.finfo(jnp.float32).min
  if allowed_BxV is not None:
    logits = jnp.where(allowed_BxV, logits, neg)
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / config.temperature
  V = logits.shape[-1]
  if config.top_k and config.top_k < V:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if config.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep a token while the mass before it is below top_p (the first always).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < config.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
  """Per row: the next token's index (cache slot) and M-RoPE position."""
  index_B: jax.Array
  position_B: jax.Array


def prompt_state(batch: Mapping[str, jax.Array]) -> DecodeState:
  """Where each prompt row ends: index = its length, position = max position + 1."""
  valid = batch['segment_ids'] > 0
  index = batch.get('token_index')
  if index is None:
    index = jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), valid.shape)
  length = jnp.max(jnp.where(valid, index, -1), axis=1) + 1
  pos = jnp.max(jnp.where(valid[..., None], batch['positions'], -1), axis=(1, 2)) + 1
  return DecodeState(length.astype(jnp.int32), pos.astype(jnp.int32))


def last_logits(logits_BxTxV: jax.Array, batch: Mapping[str, jax.Array],
                state: DecodeState) -> jax.Array:
  """The logits at each row's last prompt token (any layout: found by index)."""
  index = batch.get('token_index')
  T = logits_BxTxV.shape[1]
  if index is None:
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), logits_BxTxV.shape[:2])
  at = jnp.argmax(index == (state.index_B - 1)[:, None], axis=1)
  return jnp.take_along_axis(logits_BxTxV, at[:, None, None], axis=1)[:, 0]


def prefill(model, batch: Mapping[str, jax.Array], cache):
  """Runs the prompts through the model, filling `cache`.

  Returns (logits_BxV at each row's last prompt token, cache, DecodeState).
  """
  logits, _, cache = model(batch, cache, prefill=True)
  state = prompt_state(batch)
  return last_logits(logits, batch, state), cache, state


def step_batch(token_B: jax.Array, state: DecodeState, *,
               modality: int | jax.Array = TEXT, active_B: jax.Array | None = None) -> dict:
  """The one-token batch of a decode step (text-like: block 0, own position)."""
  B = token_B.shape[0]
  pos = jnp.broadcast_to(state.position_B[:, None, None], (B, 1, 3))
  seg = jnp.ones((B, 1), jnp.int32) if active_B is None else active_B[:, None].astype(jnp.int32)
  return {
      'tokens': token_B[:, None].astype(jnp.int32),
      'positions': pos.astype(jnp.int32),
      'segment_ids': seg,
      'block_ids': jnp.zeros((B, 1), jnp.int32),
      'modality': jnp.broadcast_to(jnp.asarray(modality, jnp.int8), (B,))[:, None],
      'token_index': state.index_B[:, None],
  }


def step(model, token_B: jax.Array, state: DecodeState, cache, *,
         positions_Bx3: jax.Array | None = None, modality: int | jax.Array = TEXT):
  """Feeds one token per row; returns (logits_BxV for the next, cache, state + 1).

  `positions_Bx3` overrides the text-diagonal position (e.g. an image code's
  (t, row, col)); the next position is then the max of it + 1.
  """
  batch = step_batch(token_B, state, modality=modality)
  if positions_Bx3 is not None:
    batch['positions'] = positions_Bx3[:, None, :].astype(jnp.int32)
  logits, _, cache = model(batch, cache)
  nxt = jnp.max(batch['positions'][:, 0], axis=-1) + 1
  return logits[:, 0], cache, DecodeState(state.index_B + 1,
                                          jnp.maximum(state.position_B, nxt))


class Generation(NamedTuple):
  tokens_BxN: jax.Array     # generated ids; `pad` after a row's stop token
  lengths_B: jax.Array      # tokens generated per row, its stop token included
  stopped_B: jax.Array      # the row emitted a stop token


def generate_tokens(model, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                    max_new_tokens: int, max_len: int, sampling: SamplingConfig = GREEDY,
                    stop_tokens: Sequence[int] = (), pad_id: int = 0) -> Generation:
  """Prefill + a while loop of decode steps (call under jit; see `Sampler`)."""
  B = batch['tokens'].shape[0]
  cache = model.init_cache(B, max_len)
  logits, cache, state = prefill(model, batch, cache)
  stops = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)
  rng, sub = jax.random.split(rng)
  tok = sample(logits, sub, sampling)
  out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  done = jnp.isin(tok, stops)
  lengths = jnp.ones((B,), jnp.int32)

  def cond(c):
    i, _, _, _, _, _, done, _ = c
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(c):
    i, tok, state, cache, out, lengths, done, rng = c
    logits, cache, state = step(model, tok, state, cache)
    rng, sub = jax.random.split(rng)
    tok = sample(logits, sub, sampling)
    out = out.at[:, i].set(jnp.where(done, pad_id, tok))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, stops)
    return i + 1, tok, state, cache, out, lengths, done, rng

  init = (jnp.asarray(1, jnp.int32), tok, state, cache, out, lengths, done, rng)
  _, _, _, _, out, lengths, done, _ = jax.lax.while_loop(cond, body, init)
  return Generation(out, lengths, done)


def recompute_tokens(model, batch: Mapping[str, jax.Array], *, max_new_tokens: int,
                     pad_id: int = 0) -> jax.Array:
  """Greedy generation without a cache: the whole sequence re-run for every token.

  The reference the cached loop is tested and benchmarked against. `batch`
  must have room for the new tokens (T >= longest prompt + max_new_tokens).
  """
  del pad_id
  B = batch['tokens'].shape[0]
  rows = jnp.arange(B)

  def body(i, carry):
    b, state, out = carry
    logits, _, _ = model(b)
    tok = jnp.argmax(last_logits(logits, b, state), axis=-1).astype(jnp.int32)
    j, p = state.index_B, state.position_B
    b = dict(b, tokens=b['tokens'].at[rows, j].set(tok),
             positions=b['positions'].at[rows, j].set(jnp.stack([p, p, p], -1)),
             segment_ids=b['segment_ids'].at[rows, j].set(1),
             modality=b['modality'].at[rows, j].set(TEXT))
    return b, DecodeState(j + 1, p + 1), out.at[:, i].set(tok)

  init = (dict(batch), prompt_state(batch), jnp.zeros((B, max_new_tokens), jnp.int32))
  return jax.lax.fori_loop(0, max_new_tokens, body, init)[2]


class Sampler:
  """A model (graphdef + params) with its jitted generate loop, compiled once
  per (batch shape, max_new_tokens, max_len, sampling, stop tokens)."""

  def __init__(self, model: nnx.Module | None = None, *, graphdef=None, params=None,
               mesh=None):
    if model is not None:
      graphdef, state = nnx.split(model)
      params = state
    if graphdef is None or params is None:
      raise ValueError('Sampler needs a model, or graphdef and params')
    self.graphdef, self.params, self.mesh = graphdef, params, mesh
    self._fns: dict[Any, Any] = {}

  def _run(self, key, fn, *args):
    if key not in self._fns:
      self._fns[key] = jax.jit(fn)
    if self.mesh is None:
      return self._fns[key](*args)
    from gemjax.parallel.sharding import use_mesh
    with use_mesh(self.mesh):
      return self._fns[key](*args)

  def generate(self, batch: Mapping[str, Any], rng: jax.Array | None = None, *,
               max_new_tokens: int, max_len: int, sampling: SamplingConfig = GREEDY,
               stop_tokens: Sequence[int] = (), pad_id: int = 0) -> Generation:
    rng = jax.random.key(0) if rng is None else rng
    stop_tokens = tuple(int(s) for s in stop_tokens)
    key = ('generate', max_new_tokens, max_len, sampling, stop_tokens, pad_id)

    def fn(params, batch, rng):
      model = nnx.merge(self.graphdef, params)
      return generate_tokens(model, batch, rng, max_new_tokens=max_new_tokens,
                             max_len=max_len, sampling=sampling, stop_tokens=stop_tokens,
                             pad_id=pad_id)

    return self._run(key, fn, self.params, dict(batch), rng)

  def prefill(self, batch: Mapping[str, Any], max_len: int):
    """(logits_BxV, cache, state) of the prompts, jitted."""
    def fn(params, batch):
      model = nnx.merge(self.graphdef, params)
      cache = model.init_cache(batch['tokens'].shape[0], max_len)
      return prefill(model, batch, cache)
    return self._run(('prefill', max_len), fn, self.params, dict(batch))

  def step(self, token_B, state: DecodeState, cache):
    """(logits_BxV, cache, state) after feeding one token per row, jitted."""
    def fn(params, token_B, state, cache):
      return step(nnx.merge(self.graphdef, params), token_B, state, cache)
    return self._run(('step',), fn, self.params, token_B, state, cache)

  def stream(self, batch: Mapping[str, Any], rng: jax.Array | None = None, *,
             max_new_tokens: int, max_len: int, sampling: SamplingConfig = GREEDY,
             stop_tokens: Sequence[int] = ()):
    """Yields one int32 [B] array of tokens per step (host loop over the jitted
    step: the same math as `generate`, for printing as tokens arrive). Stops
    when every row has emitted a stop token."""
    import numpy as np
    rng = jax.random.key(0) if rng is None else rng
    sample_fn = self._fns.setdefault(('sample', sampling), jax.jit(
        functools.partial(sample, config=sampling)))
    logits, cache, state = self.prefill(batch, max_len)
    done = None
    for _ in range(max_new_tokens):
      rng, sub = jax.random.split(rng)
      tok = sample_fn(logits, sub)
      host = np.asarray(tok)
      yield host
      hit = np.isin(host, list(stop_tokens))
      done = hit if done is None else done | hit
      if done.all():
        return
      logits, cache, state = self.step(tok, state, cache)
