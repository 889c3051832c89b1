"""Multimodal output: constrained decoding of text and image blocks in one
vocabulary, and classifier-free guidance on image codes.

The model writes images the way the sequence builder (gemjax/data/sequence.py)
writes an `image_code` segment:

    ... text  begin_image  c_0 c_1 ... c_{H*W-1}  end_image  text ... eos

and decoding enforces that grammar per row, inside the jitted loop:

  text mode   text ids, eos (and the other stop tokens), and begin_image, but
              begin_image only while the budget left can hold a whole image
              (begin + H*W codes + end_image); every other special is banned.
  image mode  image codes only, exactly H*W of them, then end_image only;
              after it the row is back in text mode.

Each generated token is fed back as the builder would have written it: a text
token (markers included) at the text diagonal (p, p, p); the k-th code of an
image whose begin_image sat at p at (p + 1, p + 1 + k // W, p + 1 + k % W)
with modality IMAGE_CODE; end_image at max position + 1.

Classifier-free guidance (Ho & Salimans 2022; as used for token images by
Make-A-Scene and Chameleon): the batch holds B conditional rows and, behind
them, B unconditional rows (the same prompts with their text dropped, as
`cond_dropout` drops it in training) in ONE cache. Each row keeps its own
index and positions, so prompts of different lengths need no padding shifts.
On image codes the logits are mixed as u + s (c - u); text is sampled from
the conditional row alone; the token drawn is fed to both rows of a pair.
With s = 1 this is plain conditional sampling.

Imports jax, the batch contract and gemjax.inference.decode.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemjax.batch import IMAGE_CODE, TEXT
from gemjax.inference.decode import GREEDY, SamplingConfig, prefill, sample, step


@dataclasses.dataclass(frozen=True)
class ImageBlocks:
  """Where image blocks sit in the vocabulary, and their code grid."""
  text_size: int        # ids [0, text_size) are text
  eos: int
  begin_image: int
  end_image: int
  code_start: int       # codes are [code_start, code_start + num_codes)
  num_codes: int
  grid_h: int
  grid_w: int

  def __post_init__(self):
    if self.num_codes <= 0:
      raise ValueError(f'ImageBlocks.num_codes={self.num_codes}: the vocabulary has no image '
                       f'codes (set data.image_codes to an image-code tokenizer)')
    if self.grid_h <= 0 or self.grid_w <= 0:
      raise ValueError(f'ImageBlocks grid ({self.grid_h}, {self.grid_w}) must be positive')

  @classmethod
  def from_layout(cls, layout, grid: tuple[int, int]) -> 'ImageBlocks':
    """From a `VocabLayout` and the code tokenizer's grid (h, w)."""
    return cls(text_size=layout.text_size, eos=layout.eos, begin_image=layout.begin_image,
               end_image=layout.end_image, code_start=layout.image_code_start,
               num_codes=layout.num_image_codes, grid_h=int(grid[0]), grid_w=int(grid[1]))

  @property
  def num_tokens(self) -> int:
    """Codes per image (H * W)."""
    return self.grid_h * self.grid_w

  @property
  def block_length(self) -> int:
    """Tokens of a whole image block: begin_image, the codes, end_image."""
    return self.num_tokens + 2


class ImageState(NamedTuple):
  """Per row: inside an image block, codes emitted in it, and the block's
  start position (begin_image's position + 1)."""
  in_image_B: jax.Array
  emitted_B: jax.Array
  start_B: jax.Array

  @classmethod
  def text(cls, rows: int) -> 'ImageState':
    z = jnp.zeros((rows,), jnp.int32)
    return cls(jnp.zeros((rows,), bool), z, z)


def allowed_tokens(ist: ImageState, remaining_B: jax.Array, blocks: ImageBlocks, vocab: int,
                   stop_tokens: Sequence[int] = (), allow_images: bool = True) -> jax.Array:
  """bool [B, V]: the tokens each row may emit next.

  `remaining_B` counts the tokens a row may still generate, this one included.
  """
  ids = jnp.arange(vocab, dtype=jnp.int32)[None, :]
  text_ok = (ids < blocks.text_size) | (ids == blocks.eos)
  for s in stop_tokens:
    text_ok = text_ok | (ids == int(s))
  if allow_images:
    room = jnp.broadcast_to(jnp.asarray(remaining_B) >= blocks.block_length,
                            ist.in_image_B.shape)[:, None]
    text_ok = text_ok | ((ids == blocks.begin_image) & room)
  is_code = (ids >= blocks.code_start) & (ids < blocks.code_start + blocks.num_codes)
  image_ok = jnp.where((ist.emitted_B < blocks.num_tokens)[:, None], is_code,
                       ids == blocks.end_image)
  return jnp.where(ist.in_image_B[:, None], image_ok, text_ok)


def feed(token_B: jax.Array, ist: ImageState, position_B: jax.Array, blocks: ImageBlocks):
  """How a sampled token goes back in: (modality_B, positions_Bx3, next ImageState).

  `position_B` is the row's next text position (DecodeState.position_B).
  """
  n = blocks.num_tokens
  is_code = ist.in_image_B & (ist.emitted_B < n)
  row, col = ist.emitted_B // blocks.grid_w, ist.emitted_B % blocks.grid_w
  code_pos = jnp.stack([ist.start_B, ist.start_B + row, ist.start_B + col], axis=-1)
  text_pos = jnp.broadcast_to(position_B[:, None], code_pos.shape)
  positions = jnp.where(is_code[:, None], code_pos, text_pos)
  modality = jnp.where(is_code, IMAGE_CODE, TEXT).astype(jnp.int8)
  begins = ~ist.in_image_B & (token_B == blocks.begin_image)
  ends = ist.in_image_B & (ist.emitted_B >= n)
  nxt = ImageState(in_image_B=(ist.in_image_B & ~ends) | begins,
                   emitted_B=jnp.where(begins, 0, ist.emitted_B + is_code.astype(jnp.int32)),
                   start_B=jnp.where(begins, position_B + 1, ist.start_B))
  return modality, positions.astype(jnp.int32), nxt


def guide(logits_RxV: jax.Array, in_image_B: jax.Array, scale: float | jax.Array) -> jax.Array:
  """[2B, V] (conditional rows, then unconditional) -> [B, V]: u + s (c - u)
  on rows inside an image block, the conditional logits elsewhere.

  Written c + (s - 1)(c - u): the same mix, and exactly c at s = 1.
  """
  B = logits_RxV.shape[0] // 2
  c = logits_RxV[:B].astype(jnp.float32)
  u = logits_RxV[B:].astype(jnp.float32)
  return jnp.where(in_image_B[:, None], c + (scale - 1.0) * (c - u), c)


class MultimodalGeneration(NamedTuple):
  tokens_BxN: jax.Array       # generated ids; pad after a row's stop token
  lengths_B: jax.Array        # tokens generated per row, its stop token included
  stopped_B: jax.Array        # the row emitted a stop token
  positions_BxNx3: jax.Array  # the (t, h, w) each token was fed at
  modality_BxN: jax.Array     # TEXT or IMAGE_CODE, as each token was fed


def generate_multimodal(model, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                        blocks: ImageBlocks, max_new_tokens: int, max_len: int,
                        sampling: SamplingConfig = GREEDY,
                        guidance_scale: float | None = None,
                        stop_tokens: Sequence[int] = (), pad_id: int = 0,
                        allow_images: bool = True) -> MultimodalGeneration:
  """Prefill + a while loop of constrained decode steps (call under jit).

  With `guidance_scale`, `batch` has 2B rows: B conditional prompts, then
  their B unconditional twins; the result has the B conditional rows.
  """
  R = batch['tokens'].shape[0]
  guided = guidance_scale is not None
  if guided and R % 2:
    raise ValueError(f'classifier-free guidance needs conditional and unconditional rows '
                     f'(an even batch), got {R} rows')
  B = R // 2 if guided else R
  stop_tokens = tuple(int(s) for s in stop_tokens) or (blocks.eos,)
  stops = jnp.asarray(stop_tokens, jnp.int32)
  cache = model.init_cache(R, max_len)
  logits, cache, state = prefill(model, batch, cache)
  vocab = logits.shape[-1]

  def pick(logits, ist, i, rng):
    allowed = allowed_tokens(jax.tree.map(lambda x: x[:B], ist), max_new_tokens - i, blocks,
                             vocab, stop_tokens, allow_images)
    lg = guide(logits, ist.in_image_B[:B], guidance_scale) if guided else logits
    tok = sample(lg, rng, sampling, allowed)
    return jnp.concatenate([tok, tok]) if guided else tok

  def record(out, i, tok, modality, positions, done):
    toks, pos, mod = out
    return (toks.at[:, i].set(jnp.where(done, pad_id, tok[:B])),
            pos.at[:, i].set(positions[:B]), mod.at[:, i].set(modality[:B]))

  ist = ImageState.text(R)
  rng, sub = jax.random.split(rng)
  tok = pick(logits, ist, 0, sub)
  modality, positions, ist = feed(tok, ist, state.position_B, blocks)
  out = (jnp.full((B, max_new_tokens), pad_id, jnp.int32),
         jnp.zeros((B, max_new_tokens, 3), jnp.int32),
         jnp.zeros((B, max_new_tokens), jnp.int8))
  out = record(out, 0, tok, modality, positions, jnp.zeros((B,), bool))
  done = jnp.isin(tok[:B], stops)
  lengths = jnp.ones((B,), jnp.int32)

  def cond(c):
    i, done = c[0], c[-2]
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(c):
    i, tok, modality, positions, ist, state, cache, out, lengths, done, rng = c
    logits, cache, state = step(model, tok, state, cache, positions_Bx3=positions,
                                modality=modality)
    rng, sub = jax.random.split(rng)
    tok = pick(logits, ist, i, sub)
    modality, positions, ist = feed(tok, ist, state.position_B, blocks)
    out = record(out, i, tok, modality, positions, done)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok[:B], stops)
    return i + 1, tok, modality, positions, ist, state, cache, out, lengths, done, rng

  init = (jnp.asarray(1, jnp.int32), tok, modality, positions, ist, state, cache, out,
          lengths, done, rng)
  c = jax.lax.while_loop(cond, body, init)
  (toks, pos, mod), lengths, done = c[7], c[8], c[9]
  return MultimodalGeneration(toks, lengths, done, pos, mod)


# Host side: generated ids -> text and images.

@dataclasses.dataclass
class Piece:
  kind: str                       # 'text' | 'image'
  ids: list[int]                  # text ids, or the image's code indices (row-major)
  codes: np.ndarray | None = None  # int32 [H, W] for a whole image block


def split_pieces(ids: Sequence[int], blocks: ImageBlocks,
                 stop_tokens: Sequence[int] = ()) -> tuple[list[Piece], bool]:
  """Generated ids -> (text and image pieces in order, well_formed).

  Well formed: every begin_image is followed by exactly H*W codes and then
  end_image, and no code appears outside an image block.
  """
  stops = set(int(s) for s in stop_tokens) | {blocks.eos}
  pieces: list[Piece] = []
  ok = True
  cur: Piece | None = None
  for t in (int(t) for t in ids):
    if t in stops and (cur is None or cur.kind == 'text'):
      break
    is_code = blocks.code_start <= t < blocks.code_start + blocks.num_codes
    if cur is not None and cur.kind == 'image':
      if t == blocks.end_image:
        if len(cur.ids) == blocks.num_tokens:
          cur.codes = np.asarray(cur.ids, np.int32).reshape(blocks.grid_h, blocks.grid_w)
        else:
          ok = False
        cur = None
      elif is_code:
        cur.ids.append(t - blocks.code_start)
        ok &= len(cur.ids) <= blocks.num_tokens
      else:
        ok = False
      continue
    if t == blocks.begin_image:
      cur = Piece('image', [])
      pieces.append(cur)
    elif is_code or t == blocks.end_image:
      ok = False
    else:
      if not pieces or pieces[-1].kind != 'text':
        pieces.append(Piece('text', []))
      pieces[-1].ids.append(t)
  if cur is not None:       # an image block never closed
    ok = False
  return pieces, ok


def run_multimodal(sampler, batch: Mapping[str, jax.Array], rng: jax.Array | None = None, *,
                   blocks: ImageBlocks, max_new_tokens: int, max_len: int,
                   sampling: SamplingConfig = GREEDY, guidance_scale: float | None = None,
                   stop_tokens: Sequence[int] = (), pad_id: int = 0,
                   allow_images: bool = True) -> MultimodalGeneration:
  """`generate_multimodal` through a `decode.Sampler`: compiled once per shape
  and settings; the guidance scale is an argument, so a sweep compiles once."""
  from flax import nnx
  rng = jax.random.key(0) if rng is None else rng
  stop_tokens = tuple(int(s) for s in stop_tokens)
  guided = guidance_scale is not None
  key = ('multimodal', blocks, max_new_tokens, max_len, sampling, guided, stop_tokens, pad_id,
         allow_images)

  def fn(params, batch, rng, scale):
    model = nnx.merge(sampler.graphdef, params)
    return generate_multimodal(model, batch, rng, blocks=blocks, max_new_tokens=max_new_tokens,
                               max_len=max_len, sampling=sampling,
                               guidance_scale=scale if guided else None,
                               stop_tokens=stop_tokens, pad_id=pad_id,
                               allow_images=allow_images)

  scale = jnp.asarray(1.0 if guidance_scale is None else guidance_scale, jnp.float32)
  return sampler._run(key, fn, sampler.params, dict(batch), rng, scale)


def unconditional_prompt(prompt: Mapping) -> dict:
  """The prompt without its condition (gemjax.data.condition: its text
  segments removed, what `cond_dropout` trains on). A prompt that was all text
  keeps one empty text segment: bos alone."""
  from gemjax.data.condition import unconditional_prompt as drop_text
  out = drop_text(prompt)
  if not out['segments']:
    out['segments'] = [{'kind': 'text', 'text': '', 'predict': False}]
  return out
