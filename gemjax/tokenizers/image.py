"""Image tokenizer: encoded image -> RGB -> dynamic-resolution patches.

Decoding (Pillow): JPEG (and MPO camera JPEGs), PNG, GIF (first frame), WebP,
BMP, TIFF (first page) from bytes, a path, or a decoded array. EXIF
orientation is applied. Every mode becomes RGB: alpha (RGBA, LA, PA, P or
L/RGB with a tRNS colour) is composited over `background` (white by default);
16/32-bit and float greyscale (I;16, I, F) are rescaled to 8 bits, not
clipped; CMYK via Pillow, LAB via LittleCMS.

Dynamic resolution (Qwen2-VL's `smart_resize`, in patch units), with
p = patch_size and N = max_tokens:

    rows = max(1, floor(H/p + 1/2)),  cols = max(1, floor(W/p + 1/2))
    if rows * cols > N:                  # too many tokens: shrink, keep aspect
      s = sqrt(N / ((H/p) * (W/p)))
      rows = max(1, floor(s H/p)),  cols = max(1, floor(s W/p))
      (and for extreme aspect ratios the long side is capped at N // short side)

so rows * cols <= N always, and the image is resized (bicubic) to exactly
(rows p) x (cols p) pixels; aspect ratio drifts by at most half a patch per
side. With p = 14: 224x224 -> 16x16 = 256 tokens, 896x896 -> 64x64 = 4096
tokens, 1000x1000 with N = 4096 -> 64x64.

Patches: [N, p*p*3] float32 in raster order (row-major over the grid); inside a
patch the values are ordered (y, x, channel). Pixels are normalised to [-1, 1]
as v / 127.5 - 1 (SigLIP / PaliGemma convention); `denormalize` inverts it
exactly for uint8 input. Positions are [N, 2] int32 (row, col).

Pixel-count limit: `max_pixels` is checked on the header before any pixel is
decoded, so a decompression bomb costs nothing (Pillow's own global limit is
left untouched). Every failure is a `BadInputError('image', source, reason)`.

This module imports numpy, Pillow and gemjax.errors.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from gemjax.errors import BadInputError

# Pillow opener names; 'JPEG' also opens MPO (multi-picture camera JPEGs).
DEFAULT_FORMATS = ('JPEG', 'PNG', 'GIF', 'WEBP', 'BMP', 'TIFF')
_EXIF_ORIENTATION = 0x0112


def image_grid(height: int, width: int, patch_size: int = 14,
               max_tokens: int = 4096) -> tuple[int, int]:
  """(rows, cols) of the patch grid for an image of height x width pixels.

  The rule is in the module docstring; rows * cols <= max_tokens always.
  """
  if height < 1 or width < 1:
    raise ValueError(f'image size must be positive, got {height}x{width}')
  if max_tokens < 1:
    raise ValueError(f'max_tokens must be >= 1, got {max_tokens}')
  h, w = height / patch_size, width / patch_size
  rows, cols = max(1, math.floor(h + 0.5)), max(1, math.floor(w + 0.5))
  if rows * cols <= max_tokens:
    return rows, cols
  scale = math.sqrt(max_tokens / (h * w))
  # 1e-9: h*scale is an exact integer in the common square case (896 -> 64)
  # but may come out as 63.999...; floor must not lose a whole row to that.
  rows = max(1, math.floor(h * scale + 1e-9))
  cols = max(1, math.floor(w * scale + 1e-9))
  # One side clamped to 1 (aspect > max_tokens : 1) lets the other overshoot.
  if rows * cols > max_tokens:
    if rows <= cols:
      cols = max_tokens // rows
    else:
      rows = max_tokens // cols
  return rows, cols


def patchify(image_HxWxC: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """[R p, C p, ch] -> patches [R C, p p ch] (raster order), positions [R C, 2]."""
  H, W, ch = image_HxWxC.shape
  p = patch_size
  if H % p or W % p:
    raise ValueError(f'image {H}x{W} is not a multiple of patch size {p}')
  R, C = H // p, W // p
  x_RxpxCxpxc = image_HxWxC.reshape(R, p, C, p, ch)
  patches_NxD = x_RxpxCxpxc.transpose(0, 2, 1, 3, 4).reshape(R * C, p * p * ch)
  rr, cc = np.meshgrid(np.arange(R, dtype=np.int32), np.arange(C, dtype=np.int32),
                       indexing='ij')
  positions_Nx2 = np.stack([rr.reshape(-1), cc.reshape(-1)], axis=-1)
  return patches_NxD, positions_Nx2


def unpatchify(patches_NxD: np.ndarray, positions_Nx2: np.ndarray, patch_size: int,
               channels: int = 3) -> np.ndarray:
  """Exact inverse of `patchify`: puts every patch back at its (row, col)."""
  p = patch_size
  positions_Nx2 = np.asarray(positions_Nx2)
  R, C = int(positions_Nx2[:, 0].max()) + 1, int(positions_Nx2[:, 1].max()) + 1
  x_RxCxpxpxc = np.zeros((R, C, p, p, channels), patches_NxD.dtype)
  x_RxCxpxpxc[positions_Nx2[:, 0], positions_Nx2[:, 1]] = patches_NxD.reshape(-1, p, p, channels)
  return x_RxCxpxpxc.transpose(0, 2, 1, 3, 4).reshape(R * p, C * p, channels)


def normalize(image_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image_uint8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


def denormalize(image_f32: np.ndarray) -> np.ndarray:
  """float32 [-1, 1] -> uint8; exact inverse of `normalize`."""
  return np.clip(np.rint((image_f32 + 1) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class ImageTokens:
  """One tokenized image.

  patches: [N, p*p*3] float32 in [-1, 1], raster order.
  positions: [N, 2] int32 (row, col) in the patch grid.
  grid: (rows, cols); N = rows * cols.
  """
  patches: np.ndarray
  positions: np.ndarray
  grid: tuple[int, int]

  @property
  def num_tokens(self) -> int:
    return self.patches.shape[0]


def _read_source(data: Any, source: str | None) -> tuple[io.BytesIO, str]:
  """Bytes or a path -> an in-memory file (so no file handle outlives a call)."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    return io.BytesIO(bytes(data)), source or '<bytes>'
  if isinstance(data, (str, os.PathLike)):
    path = os.fspath(data)
    source = source or path
    try:
      with open(path, 'rb') as f:
        return io.BytesIO(f.read()), source
    except OSError as e:
      raise BadInputError('image', source, f'cannot read file: {e}') from None
  raise BadInputError('image', source or '<unknown>', f'expected bytes, a path or '
                      f'an array, got {type(data).__name__}')


def array_to_pil(array: np.ndarray, source: str) -> Image.Image:
  """A decoded array (uint8/uint16/float in [0,1]; HxW, HxWx1/3/4) to a PIL image."""
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
    raise BadInputError('image', source, f'array of shape {a.shape}; expected '
                        f'[H, W], [H, W, 1], [H, W, 3] or [H, W, 4]')
  if a.shape[0] < 1 or a.shape[1] < 1:
    raise BadInputError('image', source, f'empty array of shape {a.shape}')
  if a.dtype == np.uint8:
    pass
  elif a.dtype == np.uint16:
    a = np.rint(a / 257.0).astype(np.uint8)
  elif a.dtype == bool:
    a = a.astype(np.uint8) * 255
  elif np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)):
      raise BadInputError('image', source, 'array contains NaN or inf')
    a = np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)
  else:
    raise BadInputError('image', source, f'array dtype {a.dtype}; expected uint8, '
                        f'uint16, bool or float in [0, 1]')
  return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255),
           source: str = '<image>') -> Image.Image:
  """Any Pillow mode -> RGB; alpha composited over `background`."""
  mode = im.mode
  if mode == 'RGB' and 'transparency' not in im.info:
    return im
  if mode.startswith('I') or mode == 'F':  # I;16*, I, F: high bit depth grey
    a = np.asarray(im).astype(np.float64)
    if mode.startswith('I;16'):
      a = a / 257.0
    else:
      a = np.nan_to_num(a)
      lo, hi = float(a.min()), float(a.max())
      if lo >= 0 and hi <= 255:
        pass
      elif lo >= 0 and hi <= 65535:
        a = a / 257.0
      else:  # unknown range (e.g. signed 32-bit, float): stretch min..max
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
    g = np.rint(np.clip(a, 0, 255)).astype(np.uint8)
    return Image.fromarray(np.stack([g, g, g], axis=-1))
  if mode == 'LAB':  # Pillow's plain convert() copies L*a*b* channels as RGB
    from PIL import ImageCms
    transform = ImageCms.buildTransform(ImageCms.createProfile('LAB'),
                                        ImageCms.createProfile('sRGB'), 'LAB', 'RGB')
    return ImageCms.applyTransform(im, transform)
  has_alpha = mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info
  try:
    if has_alpha:
      rgba = im.convert('RGBA')
      canvas = Image.new('RGBA', rgba.size, tuple(background) + (255,))
      return Image.alpha_composite(canvas, rgba).convert('RGB')
    return im.convert('RGB')
  except (ValueError, OSError) as e:
    raise BadInputError('image', source, f'cannot convert mode {mode} to RGB: {e}') from None


@dataclasses.dataclass(frozen=True)
class ImageTokenizer:
  """Settings + methods of the image tokenizer (picklable, immutable).

  Attributes:
    patch_size: p, pixels per patch side (14 or 16 are usual).
    max_tokens: cap on rows * cols; larger images are downscaled.
    max_pixels: header-checked decompression-bomb limit (width * height).
    background: RGB colour that transparent pixels are composited on.
    formats: Pillow format names accepted; None accepts anything Pillow reads.
  """
  patch_size: int = 14
  max_tokens: int = 4096
  max_pixels: int = 8192 * 8192
  background: tuple[int, int, int] = (255, 255, 255)
  formats: tuple[str, ...] | None = DEFAULT_FORMATS

  def __post_init__(self):
    if self.patch_size < 1 or self.max_tokens < 1 or self.max_pixels < 1:
      raise ValueError(f'ImageTokenizer: patch_size, max_tokens, max_pixels must '
                       f'be >= 1, got {self.patch_size}, {self.max_tokens}, '
                       f'{self.max_pixels}')
    if self.formats is not None:
      Image.init()
      unknown = [f for f in self.formats if f not in Image.OPEN]
      if unknown:
        raise ValueError(f'ImageTokenizer: formats {unknown} are not Pillow image '
                         f'formats; valid: {sorted(Image.OPEN)}')

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3

  def grid(self, height: int, width: int) -> tuple[int, int]:
    return image_grid(height, width, self.patch_size, self.max_tokens)

  def num_tokens(self, height: int, width: int) -> int:
    rows, cols = self.grid(height, width)
    return rows * cols

  def decode(self, data: Any, source: str | None = None) -> Image.Image:
    """bytes / path / array -> oriented RGB PIL image at its own size."""
    return self._load(data, source, draft=False)[0]

  def _load(self, data: Any, source: str | None,
            draft: bool) -> tuple[Image.Image, tuple[int, int]]:
    """-> (oriented RGB image, its full-resolution oriented (height, width)).

    `draft=True` lets a large JPEG decode in the DCT domain at 1/2, 1/4 or 1/8
    size when that is still at least this tokenizer's grid size: several times
    faster, and the result is resized to the grid anyway. The grid must then
    come from the returned full size, not from the drafted image.
    """
    if isinstance(data, np.ndarray):
      source = source or '<array>'
      im = array_to_pil(data, source)
      self._check_pixels(*im.size, source)
      return to_rgb(im, self.background, source), (im.height, im.width)
    fp, source = _read_source(data, source)
    if not fp.getbuffer().nbytes:
      raise BadInputError('image', source, 'zero-length data')
    im = None
    try:
      with warnings.catch_warnings():
        # We enforce our own max_pixels on the header; Pillow's warning between
        # its limit and twice its limit is noise here.
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        im = Image.open(fp, formats=list(self.formats) if self.formats else None)
        width, height = im.size
        self._check_pixels(width, height, source)
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        transposed = orientation in (5, 6, 7, 8)
        full_hw = (width, height) if transposed else (height, width)
        if draft and im.format in ('JPEG', 'MPO'):
          rows, cols = self.grid(*full_hw)
          th, tw = rows * self.patch_size, cols * self.patch_size
          if transposed:  # draft wants the stored (unrotated) size
            th, tw = tw, th
          im.draft(None, (tw, th))
        if getattr(im, 'n_frames', 1) > 1:
          im.seek(0)
        im.load()
        if orientation != 1:
          im = ImageOps.exif_transpose(im)
    except BadInputError:
      raise
    except Image.DecompressionBombError as e:
      raise BadInputError('image', source, f'over Pillow\'s pixel limit: {e}') from None
    except Image.UnidentifiedImageError:
      allowed = ', '.join(self.formats) if self.formats else 'any Pillow format'
      raise BadInputError('image', source, f'not a decodable image (accepted: '
                          f'{allowed})') from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError,
            TypeError, struct.error, MemoryError) as e:
      # Pillow signals truncated or corrupt data with any of these.
      raise BadInputError('image', source, f'corrupt or truncated '
                          f'{getattr(im, "format", None) or "image"}: '
                          f'{type(e).__name__}: {e}') from None
    return to_rgb(im, self.background, source), full_hw

  def _check_pixels(self, width: int, height: int, source: str) -> None:
    if width < 1 or height < 1:
      raise BadInputError('image', source, f'empty image {width}x{height}')
    if width * height > self.max_pixels:
      raise BadInputError('image', source, f'{width}x{height} = {width * height} '
                          f'pixels is over the limit max_pixels={self.max_pixels}')

  def resize_to_grid(self, im: Image.Image, full_hw: tuple[int, int] | None = None) -> Image.Image:
    """Resizes to the grid of `full_hw` (default: the image's own size)."""
    rows, cols = self.grid(*(full_hw or (im.height, im.width)))
    size = (cols * self.patch_size, rows * self.patch_size)
    if im.size != size:
      im = im.resize(size, Image.Resampling.BICUBIC)
    return im

  def tokenize(self, data: Any, source: str | None = None) -> ImageTokens:
    """bytes / path / array -> ImageTokens (see module docstring)."""
    im, full_hw = self._load(data, source, draft=True)
    return self.tokenize_resized(np.asarray(self.resize_to_grid(im, full_hw)))

  def tokenize_resized(self, image_HxWx3: np.ndarray) -> ImageTokens:
    """uint8 RGB already at grid size (multiples of patch_size) -> ImageTokens."""
    patches, positions = patchify(np.ascontiguousarray(image_HxWx3), self.patch_size)
    grid = (image_HxWx3.shape[0] // self.patch_size, image_HxWx3.shape[1] // self.patch_size)
    return ImageTokens(normalize(patches), positions, grid)


# Truncated files must fail loudly, not decode as half-grey images. The flag is
# a Pillow global; we only read it, to warn if someone flipped it.
if ImageFile.LOAD_TRUNCATED_IMAGES:  # pragma: no cover
  warnings.warn('PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images '
                'will be padded instead of reported as bad input')
