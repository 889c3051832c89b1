"""Discrete image tokenizer: conv autoencoder with finite scalar quantisation.

This room turns an image into a small grid of integer codes (and back), so
that an early-fusion model can *predict* images token by token. It is the one
tokenizer here that runs JAX: a conv encoder maps an image to a
(image_size / downsample)^2 grid of `len(levels)`-dim latents, FSQ rounds each
latent dim to one of `levels[i]` values, and the code id of a grid cell is the
mixed-radix number of its rounded digits, so there are prod(levels) codes and
no codebook to learn or collapse (FSQ, Mentzer et al. 2023, "Finite Scalar
Quantization: VQ-VAE Made Simple", section 3). A conv decoder maps codes back
to pixels. Training is plain reconstruction (MSE + a small L1), no auxiliary
losses: FSQ needs no commitment or codebook loss.

Where an image-code id sits in the model vocabulary is `vocab.py`'s business,
not this module's: here ids are 0 .. num_codes - 1.

Shipped checkpoint `data/sample/image_codes/` (digits28: 28x28 grey -> 7x7
grid, 1000 codes, 67k weights, 250 kB) was made on 2 CPU cores in 76 s of
training (94 s for the whole command) with:

    python -m gemjax.tokenizers.image_codes train \\
        --data 'data/sample/train/image_digit-*' --preset digits28 \\
        --out data/sample/image_codes --steps 2000 --batch-size 16 \\
        --learning-rate 4e-3 --seed 0
    python -m gemjax.tokenizers.image_codes eval \\
        --tokenizer data/sample/image_codes --data 'data/sample/test/image_digit-*'

Reading digit shards: the CLI reads ArrayRecord shards itself (`read_images`,
array_record + msgpack, checking the record format name and version) because
`gemjax.data` sits a floor above tokenizers and may not be imported from here,
not even lazily. `tests/unit/test_image_codes.py` checks that the format
constants used here equal `gemjax.data.records`', so the two cannot drift.

Imports numpy, jax, flax.nnx, optax, Pillow, msgpack, gemjax.errors;
array_record only inside `read_images`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
from flax import nnx
from PIL import Image

from gemjax.errors import BadInputError, CheckpointError, ConfigError

FORMAT_VERSION = 1          # of the saved tokenizer directory
CONFIG_FILE = 'config.json'
PARAMS_FILE = 'params.npz'

# The record format this CLI reads; a unit test pins them to gemjax.data.records.
RECORD_FORMAT_NAME = 'gemjax.record'
RECORD_VERSIONS = (1,)


# ----------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class ImageCodeConfig:
  """Shape of one image tokenizer.

  widths[k] is the conv width at resolution image_size / 2^k, so
  len(widths) == log2(downsample) + 1: widths[0] at full resolution, widths[-1]
  at the code grid.
  """
  image_size: int = 28
  channels: int = 1
  levels: tuple[int, ...] = (8, 5, 5, 5)
  downsample: int = 4
  widths: tuple[int, ...] = (16, 32, 64)
  res_blocks: int = 0         # residual blocks at the code-grid resolution

  def __post_init__(self):
    # Lists from JSON become tuples so configs compare and hash equal.
    object.__setattr__(self, 'levels', tuple(self.levels))
    object.__setattr__(self, 'widths', tuple(self.widths))

    def bad(key, value, valid):
      raise ConfigError(f'ImageCodeConfig.{key}={value!r} is invalid: {valid}')

    if not isinstance(self.image_size, int) or self.image_size < 1:
      bad('image_size', self.image_size, 'a positive int')
    if self.channels not in (1, 3):
      bad('channels', self.channels, '1 (grey) or 3 (RGB)')
    if (not isinstance(self.downsample, int) or self.downsample < 1
        or self.downsample & (self.downsample - 1)):
      bad('downsample', self.downsample, 'a power of two >= 1')
    if self.image_size % self.downsample:
      bad('image_size', self.image_size,
          f'must be a multiple of downsample={self.downsample}')
    if not self.levels or any(not isinstance(l, int) or l < 2 for l in self.levels):
      bad('levels', self.levels, 'a non-empty tuple of ints >= 2')
    if self.num_codes > 2**31 - 1:
      bad('levels', self.levels, f'prod(levels)={self.num_codes} must fit int32')
    stages = self.downsample.bit_length() - 1
    if len(self.widths) != stages + 1 or any(
        not isinstance(w, int) or w < 1 for w in self.widths):
      bad('widths', self.widths, f'{stages + 1} positive ints, one per resolution '
          f'(log2(downsample={self.downsample}) + 1)')
    if not isinstance(self.res_blocks, int) or self.res_blocks < 0:
      bad('res_blocks', self.res_blocks, 'an int >= 0')

  @property
  def num_codes(self) -> int:
    return math.prod(self.levels)

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.downsample
    return (side, side)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict) -> 'ImageCodeConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - known)
    if unknown:
      raise ConfigError(f'ImageCodeConfig: unknown keys {unknown}; valid: {sorted(known)}')
    return cls(**obj)


# levels: the FSQ paper's table 1 picks (8,5,5,5) for ~2^10 codes and
# (8,8,8,5,5,5) for ~2^16; 64000 codes keep 256px / 512px RGB detail while
# fitting a vocabulary slice comfortably.
PRESETS: dict[str, ImageCodeConfig] = {
    # 28px grey digits -> 7x7 = 49 tokens, 1000 codes.
    'digits28': ImageCodeConfig(),
    # 256px RGB -> 16x16 = 256 tokens, 64000 codes.
    'tpu256': ImageCodeConfig(image_size=256, channels=3, levels=(8, 8, 8, 5, 5, 5),
                              downsample=16, widths=(64, 128, 128, 256, 256),
                              res_blocks=2),
    # 512px RGB -> 32x32 = 1024 tokens, 64000 codes.
    'tpu512': ImageCodeConfig(image_size=512, channels=3, levels=(8, 8, 8, 5, 5, 5),
                              downsample=16, widths=(64, 128, 128, 256, 256),
                              res_blocks=2),
}


# ----------------------------------------------------------------------------
# Finite scalar quantisation (Mentzer et al. 2023)


class FSQ:
  """FSQ over the last axis of z (size len(levels)).

  Each dim i is bounded to (-(L_i - 1)/2, (L_i - 1)/2) by a shifted tanh,
  rounded to an integer with a straight-through gradient, and divided by
  L_i // 2 so codes lie in [-1, 1]. For even L the bound is offset by 1/2 so
  that rounding yields exactly L values, {-L/2, ..., L/2 - 1} (the paper's
  reference code, appendix A.1).
  """

  EPS = 1e-3   # keeps tanh's image strictly inside the outermost rounding bin

  def __init__(self, levels: Sequence[int]):
    self.levels = tuple(int(l) for l in levels)
    lv = np.asarray(self.levels, np.float64)
    self._half_l = (lv - 1) * (1 + self.EPS) / 2
    self._offset = np.where(lv % 2 == 0, 0.5, 0.0)
    self._shift = np.arctanh(self._offset / self._half_l)
    self._half_width = np.asarray([l // 2 for l in self.levels], np.float64)
    basis = np.cumprod([1] + list(self.levels[:-1]))
    self._basis = basis.astype(np.int64)

  @property
  def num_codes(self) -> int:
    return math.prod(self.levels)

  def bound(self, z):
    """z -> values in (-L/2, L/2) (shifted for even L); smooth in z."""
    half_l = jnp.asarray(self._half_l, jnp.float32)
    return jnp.tanh(z + jnp.asarray(self._shift, jnp.float32)) * half_l \
        - jnp.asarray(self._offset, jnp.float32)

  def bound_grad(self, z):
    """d bound(z) / dz, elementwise: half_l * (1 - tanh^2(z + shift))."""
    t = jnp.tanh(z + jnp.asarray(self._shift, jnp.float32))
    return jnp.asarray(self._half_l, jnp.float32) * (1 - t * t)

  def quantize(self, z):
    """z [..., D] float -> zhat [..., D] on the code grid in [-1, 1].

    Forward: round(bound(z)) / (L // 2). Backward: the gradient of
    bound(z) / (L // 2), i.e. rounding is the identity (straight-through).
    """
    b = self.bound(z)
    q = b + jax.lax.stop_gradient(jnp.round(b) - b)
    return q / jnp.asarray(self._half_width, jnp.float32)

  def codes_to_indices(self, zhat):
    """zhat [..., D] on the grid -> int32 ids [...] in [0, num_codes)."""
    hw = jnp.asarray(self._half_width, jnp.float32)
    digits = jnp.round(zhat * hw + hw).astype(jnp.int32)
    return jnp.sum(digits * jnp.asarray(self._basis, jnp.int32), axis=-1).astype(jnp.int32)

  def indices_to_codes(self, idx):
    """int ids [...] -> zhat [..., D] float32 (exact inverse of codes_to_indices)."""
    idx = jnp.asarray(idx, jnp.int32)[..., None]
    digits = (idx // jnp.asarray(self._basis, jnp.int32)) % jnp.asarray(self.levels, jnp.int32)
    hw = jnp.asarray(self._half_width, jnp.float32)
    return (digits.astype(jnp.float32) - hw) / hw


# ----------------------------------------------------------------------------
# Model


class ResBlock(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(width, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)

  def __call__(self, x_BxHxWxC):
    return x_BxHxWxC + self.conv2(nnx.silu(self.conv1(nnx.silu(x_BxHxWxC))))


class ImageCodeModel(nnx.Module):
  """Conv encoder (stride-2 convs) -> FSQ -> conv decoder (nearest x2 + conv).

  Pixels enter and leave as floats in [-1, 1] (v / 127.5 - 1, as image.py).
  Upsampling is nearest-neighbour then a 3x3 conv rather than a transposed
  conv, which avoids checkerboard artefacts (Odena et al. 2016).
  """

  def __init__(self, *, channels: int, levels: Sequence[int], widths: Sequence[int],
               res_blocks: int, rngs: nnx.Rngs):
    self.fsq = FSQ(levels)
    dim = len(self.fsq.levels)
    widths = tuple(widths)
    self.enc_in = nnx.Conv(channels, widths[0], (3, 3), rngs=rngs)
    self.enc_down = nnx.List([
        nnx.Conv(widths[k], widths[k + 1], (4, 4), strides=(2, 2), rngs=rngs)
        for k in range(len(widths) - 1)])
    self.enc_res = nnx.List([ResBlock(widths[-1], rngs=rngs) for _ in range(res_blocks)])
    self.enc_out = nnx.Conv(widths[-1], dim, (1, 1), rngs=rngs)
    self.dec_in = nnx.Conv(dim, widths[-1], (3, 3), rngs=rngs)
    self.dec_res = nnx.List([ResBlock(widths[-1], rngs=rngs) for _ in range(res_blocks)])
    self.dec_up = nnx.List([
        nnx.Conv(widths[k + 1], widths[k], (3, 3), rngs=rngs)
        for k in reversed(range(len(widths) - 1))])
    self.dec_out = nnx.Conv(widths[0], channels, (3, 3), rngs=rngs)

  @classmethod
  def from_config(cls, config: ImageCodeConfig, rngs: nnx.Rngs) -> 'ImageCodeModel':
    return cls(channels=config.channels, levels=config.levels, widths=config.widths,
               res_blocks=config.res_blocks, rngs=rngs)

  def encode_latents(self, x_BxHxWxC):
    """Pixels -> quantised latents zhat [B, h, w, D] in [-1, 1]."""
    h = self.enc_in(x_BxHxWxC)
    for conv in self.enc_down:
      h = conv(nnx.silu(h))
    for block in self.enc_res:
      h = block(h)
    return self.fsq.quantize(self.enc_out(nnx.silu(h)))

  def encode(self, x_BxHxWxC):
    """Pixels -> int32 code ids [B, h, w]."""
    return self.fsq.codes_to_indices(self.encode_latents(x_BxHxWxC))

  def decode_latents(self, zhat_BxhxwxD):
    h = self.dec_in(zhat_BxhxwxD)
    for block in self.dec_res:
      h = block(h)
    for conv in self.dec_up:
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = conv(nnx.silu(h))
    return self.dec_out(nnx.silu(h))

  def decode(self, idx_Bxhxw):
    """Code ids [B, h, w] -> pixels [B, H, W, C] in about [-1, 1]."""
    return self.decode_latents(self.fsq.indices_to_codes(idx_Bxhxw))

  def __call__(self, x_BxHxWxC):
    """-> (reconstruction [B, H, W, C], code ids [B, h, w])."""
    zhat = self.encode_latents(x_BxHxWxC)
    return self.decode_latents(zhat), self.fsq.codes_to_indices(zhat)


# ----------------------------------------------------------------------------
# Host-side tokenizer


def _bucket(n: int, cap: int) -> int:
  """Batch size a chunk of n images is padded to: a power of two up to cap,
  so any N compiles at most log2(cap) + 1 shapes."""
  return min(cap, 1 << max(0, (n - 1).bit_length()))


class ImageCodeTokenizer:
  """Images <-> code grids with a trained ImageCodeModel (numpy in, numpy out).

  encode: uint8 (or float in [0, 1]) images, one or a batch ->
      int32 [h, w] / [N, h, w] in [0, num_codes).
    Shapes: [H, W] one grey image; [N, H, W, C] a batch; [H, W, C] one image
    when C is 1, 3 or 4 (RGBA: alpha dropped), else [N, H, W] a grey batch.
    Other sizes are resized (bicubic, Pillow) to image_size; grey <-> RGB is
    converted (RGB -> grey with ITU-R 601 luma, as Pillow's 'L').
  decode: int [h, w] / [N, h, w] -> uint8 [H, W, C] / [N, H, W, C].

  Work runs in chunks of at most `max_batch` images padded to a power of two;
  jax.jit caches one executable per padded shape.
  """

  def __init__(self, config: ImageCodeConfig, model: ImageCodeModel, max_batch: int = 256):
    self.config = config
    self.num_codes = config.num_codes
    self.grid = config.grid
    self.max_batch = max_batch
    self.model = model
    self._graphdef, self._state = nnx.split(model)
    graphdef = self._graphdef

    @jax.jit
    def _encode(state, x_BxHxWxC):
      return nnx.merge(graphdef, state).encode(x_BxHxWxC)

    @jax.jit
    def _decode(state, idx_Bxhxw):
      x = nnx.merge(graphdef, state).decode(idx_Bxhxw)
      return jnp.clip(jnp.round((x + 1) * 127.5), 0, 255).astype(jnp.uint8)

    self._encode_fn, self._decode_fn = _encode, _decode

  @classmethod
  def init(cls, config: ImageCodeConfig, seed: int = 0) -> 'ImageCodeTokenizer':
    """An untrained tokenizer (random weights): for tests and as train's start."""
    return cls(config, ImageCodeModel.from_config(config, nnx.Rngs(seed)))

  # -- input checks --

  def prepare(self, images: Any) -> tuple[np.ndarray, bool]:
    """Any accepted image input -> (uint8 [N, S, S, C], was_single)."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
      pass
    elif np.issubdtype(arr.dtype, np.floating):
      if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
        raise BadInputError('image', f'array {arr.shape} {arr.dtype}',
                            'float images must be finite and in [0, 1]')
      arr = np.round(arr * 255).astype(np.uint8)
    else:
      raise BadInputError('image', f'array {arr.shape} {arr.dtype}',
                          'dtype must be uint8 or float in [0, 1]')
    if arr.ndim == 2:
      single, arr = True, arr[None, :, :, None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
      single, arr = True, arr[None]
    elif arr.ndim == 3:
      single, arr = False, arr[..., None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
      single = False
    else:
      raise BadInputError('image', f'array {arr.shape} {arr.dtype}',
                          'expected [H, W], [H, W, C], [N, H, W] or [N, H, W, C] '
                          'with C in 1, 3, 4')
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
      raise BadInputError('image', f'array {arr.shape} {arr.dtype}', 'empty image or batch')
    s, c = self.config.image_size, self.config.channels
    if arr.shape[1:] != (s, s, c):
      arr = np.stack([self._convert(a, s, c) for a in arr])
    return np.ascontiguousarray(arr), single

  @staticmethod
  def _convert(a_HxWxC: np.ndarray, size: int, channels: int) -> np.ndarray:
    mode = {1: 'L', 3: 'RGB', 4: 'RGBA'}[a_HxWxC.shape[-1]]
    im = Image.fromarray(a_HxWxC[..., 0] if mode == 'L' else a_HxWxC, mode)
    im = im.convert('L' if channels == 1 else 'RGB')
    if im.size != (size, size):
      im = im.resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(im)
    return out[..., None] if channels == 1 else out

  def _chunks(self, n: int):
    for start in range(0, n, self.max_batch):
      yield start, min(n, start + self.max_batch)

  # -- public API --

  def encode(self, images: Any) -> np.ndarray:
    x, single = self.prepare(images)
    out = []
    for a, b in self._chunks(len(x)):
      pad = _bucket(b - a, self.max_batch)
      xb = np.zeros((pad,) + x.shape[1:], np.float32)
      xb[:b - a] = x[a:b] / np.float32(127.5) - 1
      out.append(np.asarray(self._encode_fn(self._state, xb))[:b - a])
    codes = np.concatenate(out).astype(np.int32)
    return codes[0] if single else codes

  def decode(self, codes: Any) -> np.ndarray:
    arr = np.asarray(codes)
    h, w = self.grid
    if not (np.issubdtype(arr.dtype, np.integer) and arr.ndim in (2, 3)
            and arr.shape[-2:] == (h, w)):
      raise ValueError(f'codes {arr.shape} {arr.dtype}: expected ints of shape '
                       f'[{h}, {w}] or [N, {h}, {w}]')
    if arr.size and (arr.min() < 0 or arr.max() >= self.num_codes):
      raise ValueError(f'codes out of range [{arr.min()}, {arr.max()}]: valid ids are '
                       f'0 .. {self.num_codes - 1} (range [0, {self.num_codes}))')
    single = arr.ndim == 2
    idx = arr[None] if single else arr
    out = []
    for a, b in self._chunks(len(idx)):
      pad = _bucket(b - a, self.max_batch)
      ib = np.zeros((pad, h, w), np.int32)
      ib[:b - a] = idx[a:b]
      out.append(np.asarray(self._decode_fn(self._state, ib))[:b - a])
    images = np.concatenate(out) if out else np.zeros((0,) + self._image_shape(), np.uint8)
    return images[0] if single else images

  def _image_shape(self):
    s = self.config.image_size
    return (s, s, self.config.channels)

  def reconstruct(self, images: Any) -> np.ndarray:
    """encode then decode; returns uint8 [N, S, S, C] (always batched)."""
    codes = self.encode(images)
    return self.decode(codes if codes.ndim == 3 else codes[None])

  # -- files --

  def save(self, directory: str, extra: dict | None = None) -> None:
    """Writes DIR/config.json and DIR/params.npz (float32, flat 'a/b/c' keys)."""
    os.makedirs(directory, exist_ok=True)
    np.savez_compressed(os.path.join(directory, PARAMS_FILE), **self.params())
    meta = {'format': 'gemjax.image_codes', 'format_version': FORMAT_VERSION,
            'config': self.config.to_json(), **(extra or {})}
    with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
      json.dump(meta, f, indent=2)
      f.write('\n')

  @classmethod
  def load(cls, directory: str) -> 'ImageCodeTokenizer':
    cfg_path = os.path.join(directory, CONFIG_FILE)
    params_path = os.path.join(directory, PARAMS_FILE)
    for p in (cfg_path, params_path):
      if not os.path.isfile(p):
        raise CheckpointError(f'image code tokenizer: {p} does not exist')
    try:
      with open(cfg_path) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f'image code tokenizer: {cfg_path} is not valid JSON: {e}') from e
    version = meta.get('format_version') if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
      raise CheckpointError(f'image code tokenizer: {cfg_path} has format_version '
                            f'{version!r}; this gemjax reads {FORMAT_VERSION}')
    try:
      config = ImageCodeConfig.from_json(meta['config'])
    except (KeyError, TypeError, ConfigError) as e:
      raise CheckpointError(f'image code tokenizer: {cfg_path}: bad config: {e}') from e
    try:
      with np.load(params_path) as npz:
        saved = {k: npz[k] for k in npz.files}
    except Exception as e:  # zipfile / pickle / OS errors for a corrupt file
      raise CheckpointError(f'image code tokenizer: {params_path} is not a readable '
                            f'.npz file: {e}') from e
    return cls.from_params(config, saved, source=params_path)

  def params(self) -> dict[str, np.ndarray]:
    """The weights as numpy arrays keyed by their 'a/b/c' path."""
    return {'/'.join(str(k) for k in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(self.model, nnx.Param))}

  @classmethod
  def from_params(cls, config: ImageCodeConfig, saved: dict[str, np.ndarray],
                  source: str = 'params') -> 'ImageCodeTokenizer':
    """Inverse of params(); a missing or misshapen weight -> CheckpointError."""
    # Shapes only: running the initialisers eagerly would compile every one
    # of them (~4 s on a CPU at every eval.py start), for weights replaced below.
    abstract = nnx.eval_shape(lambda: ImageCodeModel.from_config(config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    new = []
    for path, v in nnx.to_flat_state(abstract_params):
      key = '/'.join(str(k) for k in path)
      if key not in saved:
        raise CheckpointError(f'image code tokenizer: {source} lacks parameter '
                              f'{key!r} (config and params do not match)')
      want = v.get_value()
      if saved[key].shape != want.shape:
        raise CheckpointError(f'image code tokenizer: {source}: parameter {key!r} '
                              f'has shape {saved[key].shape}, config needs {want.shape}')
      new.append((path, v.replace(jnp.asarray(saved[key], want.dtype))))
    return cls(config, nnx.merge(graphdef, nnx.from_flat_state(new)))

  def __reduce__(self):
    # Data-loader worker processes receive the tokenizer by pickling: send
    # config and numpy weights; jitted functions are rebuilt on arrival.
    return (_tokenizer_from_params, (self.config.to_json(), self.params(), self.max_batch))


def _tokenizer_from_params(config_json: dict, params: dict, max_batch: int):
  tok = ImageCodeTokenizer.from_params(ImageCodeConfig.from_json(config_json), params)
  tok.max_batch = max_batch
  return tok


# ----------------------------------------------------------------------------
# Training


def reconstruction_loss(recon, target, l1_weight: float = 0.1):
  """MSE + l1_weight * L1 on [-1, 1] pixels. The L1 term keeps pulling on
  small residuals, which MSE's gradient all but ignores near convergence."""
  diff = recon - target
  return jnp.mean(diff * diff) + l1_weight * jnp.mean(jnp.abs(diff))


def train(config: ImageCodeConfig, images_uint8_NxHxWxC: np.ndarray, *, steps: int,
          batch_size: int, learning_rate: float, seed: int,
          log_every: int = 100, verbose: bool = False) -> tuple[ImageCodeTokenizer, dict]:
  """Trains a tokenizer on images (any accepted shape; converted to config's).

  AdamW (weight decay 1e-4), linear warmup over 5% of steps then cosine decay
  to 5% of learning_rate. Batches are drawn without replacement per epoch
  with numpy's RNG seeded by `seed`; params are initialised from `seed`.
  Returns (tokenizer, history) with history = {'step': [...], 'loss': [...],
  'seconds': [...] (wall time at each logged step), 'train_seconds': float
  (wall time of all steps, compile included)}.
  """
  if steps < 1 or batch_size < 1 or not learning_rate > 0:
    raise ConfigError(f'train: steps={steps}, batch_size={batch_size}, '
                      f'learning_rate={learning_rate}: all must be positive')
  tok = ImageCodeTokenizer.init(config, seed)
  data, _ = tok.prepare(images_uint8_NxHxWxC)
  if data.ndim != 4:
    raise BadInputError('image', f'train images {data.shape}', 'need a batch of images')
  data_f = jnp.asarray(data, jnp.float32) / 127.5 - 1
  n = len(data)
  batch_size = min(batch_size, n)

  model = tok.model
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 20), steps, learning_rate * 0.05)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

  @nnx.jit
  def step_fn(model, optimizer, x_BxHxWxC):
    def loss_fn(model):
      recon, _ = model(x_BxHxWxC)
      return reconstruction_loss(recon, x_BxHxWxC)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  order, pos = rng.permutation(n), 0
  history = {'step': [], 'loss': [], 'seconds': []}
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    if pos + batch_size > n:
      order, pos = rng.permutation(n), 0
    idx = order[pos:pos + batch_size]
    pos += batch_size
    loss = step_fn(model, optimizer, data_f[idx])
    if step % log_every == 0 or step == steps:
      history['step'].append(step)
      history['loss'].append(float(loss))
      history['seconds'].append(time.perf_counter() - t0)
      if verbose:
        print(f'step {step:5d}  loss {float(loss):.5f}  '
              f'{time.perf_counter() - t0:6.1f}s', flush=True)
  history['train_seconds'] = time.perf_counter() - t0
  return ImageCodeTokenizer(config, model), history


# ----------------------------------------------------------------------------
# Metrics


def psnr(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
  """PSNR in dB over the whole set: 10 log10(255^2 / MSE over all pixels)."""
  mse = np.mean((a_uint8.astype(np.float64) - b_uint8.astype(np.float64)) ** 2)
  return float('inf') if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a_NxHxWxC: np.ndarray, b_NxHxWxC: np.ndarray, win: int = 7) -> float:
  """Mean SSIM (Wang et al. 2004, eq. 13) over images, with a uniform win x win
  window, K1 = 0.01, K2 = 0.03, L = 255, sample covariances, averaged over the
  valid window positions and channels: scikit-image's structural_similarity
  defaults, which a unit test checks this against."""
  x = a_NxHxWxC.astype(np.float64)
  y = b_NxHxWxC.astype(np.float64)
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  npix = win * win
  cov_norm = npix / (npix - 1)

  def mean(v):  # [N, H, W, C] -> window means [N, H-win+1, W-win+1, C]
    w = np.lib.stride_tricks.sliding_window_view(v, (win, win), axis=(1, 2))
    return w.mean(axis=(-2, -1))

  ux, uy = mean(x), mean(y)
  vx = cov_norm * (mean(x * x) - ux * ux)
  vy = cov_norm * (mean(y * y) - uy * uy)
  vxy = cov_norm * (mean(x * y) - ux * uy)
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
  return float(s.mean(axis=(1, 2, 3)).mean())


def evaluate(tokenizer: ImageCodeTokenizer, images: np.ndarray) -> dict:
  """PSNR, SSIM and code usage of encode -> decode on a batch of images."""
  x, _ = tokenizer.prepare(images)
  codes = tokenizer.encode(x)
  recon = tokenizer.decode(codes)
  used = np.unique(codes)
  return {'images': len(x), 'psnr': psnr(x, recon), 'ssim': ssim(x, recon),
          'codes_used': int(used.size), 'code_usage': used.size / tokenizer.num_codes}


# ----------------------------------------------------------------------------
# Reading digit shards and the command line


def read_images(pattern: str, task: str | None = None) -> tuple[np.ndarray, list]:
  """Image segments of gemjax records in ArrayRecord shards matching `pattern`.

  Returns (uint8 [N, H, W] or [N, H, W, C] as decoded by Pillow, list of each
  record's meta). Takes the first image segment of each record; records with
  none are skipped. All images must share one size. Raises BadInputError
  naming the shard and record index for an unreadable record.
  """
  from array_record.python import array_record_module  # heavy C++ extension

  paths = sorted(glob.glob(pattern))
  if not paths:
    raise BadInputError('record', pattern, 'no shard matches this pattern')
  images, metas = [], []
  for path in paths:
    reader = array_record_module.ArrayRecordReader(path, 'readahead_buffer_size:0')
    if not reader.ok():
      raise BadInputError('record', path, 'not a readable ArrayRecord file')
    try:
      raw = reader.read(list(range(reader.num_records())))
    finally:
      reader.close()
    for i, data in enumerate(raw):
      where = f'{path}:{i}'
      try:
        rec = msgpack.unpackb(data, raw=False)
      except Exception as e:  # msgpack raises several unrelated types
        raise BadInputError('record', where, f'not msgpack: {e}') from e
      if not isinstance(rec, dict) or rec.get('format') != RECORD_FORMAT_NAME:
        raise BadInputError('record', where, 'not a gemjax record')
      if rec.get('version') not in RECORD_VERSIONS:
        raise BadInputError('record', where, f'record format version {rec.get("version")!r} '
                            f'is not supported (this reader knows {list(RECORD_VERSIONS)})')
      if task is not None and rec.get('task') != task:
        continue
      seg = next((s for s in rec.get('segments', ()) if s.get('kind') == 'image'), None)
      if seg is None:
        continue
      try:
        im = Image.open(io.BytesIO(seg['data']))
        im.load()
      except Exception as e:
        raise BadInputError('image', where, f'cannot decode image: {e}') from e
      images.append(np.asarray(im.convert('L' if im.mode in ('L', '1', 'P', 'I', 'F')
                                          else 'RGB')))
      metas.append(rec.get('meta', {}))
  if not images:
    raise BadInputError('record', pattern, 'no image segments in these shards')
  shapes = {a.shape for a in images}
  if len(shapes) > 1:
    raise BadInputError('image', pattern, f'images differ in shape: {sorted(shapes)}')
  return np.stack(images), metas


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m gemjax.tokenizers.image_codes',
                                   description='Train or evaluate an FSQ image tokenizer.')
  sub = parser.add_subparsers(dest='cmd', required=True)
  tr = sub.add_parser('train', help='train on the images of ArrayRecord shards')
  tr.add_argument('--data', required=True, help='shard glob')
  tr.add_argument('--preset', default='digits28', choices=sorted(PRESETS))
  tr.add_argument('--out', required=True, help='output directory')
  tr.add_argument('--steps', type=int, default=2000)
  tr.add_argument('--batch-size', type=int, default=16)
  tr.add_argument('--learning-rate', type=float, default=4e-3)
  tr.add_argument('--seed', type=int, default=0)
  ev = sub.add_parser('eval', help='PSNR, SSIM and code usage on shards')
  ev.add_argument('--tokenizer', required=True, help='directory written by train')
  ev.add_argument('--data', required=True, help='shard glob')
  args = parser.parse_args(argv)

  if args.cmd == 'train':
    images, _ = read_images(args.data)
    config = PRESETS[args.preset]
    print(f'{len(images)} images {images.shape[1:]} -> preset {args.preset}: '
          f'grid {config.grid}, {config.num_codes} codes', flush=True)
    tok, hist = train(config, images, steps=args.steps, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, seed=args.seed, verbose=True)
    tok.save(args.out, extra={
        'preset': args.preset,
        'train': {'data': args.data, 'images': len(images), 'steps': args.steps,
                  'batch_size': args.batch_size, 'learning_rate': args.learning_rate,
                  'seed': args.seed, 'final_loss': hist['loss'][-1],
                  'train_seconds': round(hist['train_seconds'], 1)}})
    # No evaluation here: it would compile encode/decode too; run `eval`.
    print(f'trained {args.steps} steps in {hist["train_seconds"]:.1f}s, final loss '
          f'{hist["loss"][-1]:.5f}; saved to {args.out}')
    return 0
  tok = ImageCodeTokenizer.load(args.tokenizer)
  images, _ = read_images(args.data)
  m = evaluate(tok, images)
  print(f'{m["images"]} images: PSNR {m["psnr"]:.2f} dB  SSIM {m["ssim"]:.4f}  '
        f'code usage {m["codes_used"]}/{tok.num_codes} ({100 * m["code_usage"]:.1f}%)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
