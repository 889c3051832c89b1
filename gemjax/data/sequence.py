"""Sequence builder: one multimodal record -> one interleaved token sequence.

A record (in memory) is a dict with a list of segments, in reading order:

    {'segments': [
        {'kind': 'text',  'text': 'Describe:', 'predict': False},
        {'kind': 'image', 'data': b'<jpeg bytes>'},           # or path / array
        {'kind': 'audio', 'data': b'<wav bytes>'},            # array: + 'sample_rate'
        {'kind': 'video', 'data': b'<mp4 bytes>'},            # array: + 'frame_rate'
        {'kind': 'image_code', 'codes': np.int32 [h, w] or [n], 'predict': True},
        {'kind': 'text',  'text': 'A cat.', 'predict': True},
    ], ...}                                                   # other keys ignored

`predict` defaults to True for text and False otherwise.

An image the model is trained to produce (`{'kind': 'image', 'data': ...,
'predict': True}`) is not patched: it is decoded to pixels and encoded by the
builder's discrete code tokenizer (`image_codes`, an ImageCodeTokenizer from
gemjax/tokenizers/image_codes.py, set by the config's `data.image_codes`)
into an [h, w] grid of codes, then added exactly as an 'image_code' segment
with those codes (loss weight: the 'image_code' weight). Codes of byte
inputs are cached like tokenized media (`media_cache_mb`). Without a code
tokenizer such a segment is bad input.

Tokens. Text ids come from the text tokenizer; everything else from the
`VocabLayout` (gemjax/tokenizers/vocab.py). Optional bos first and eos last.

    image       begin_image  P..P (rows*cols placeholders)  end_image
    audio       begin_audio  P..P (steps*bands placeholders) end_audio
    video       begin_video  F0 [A0] frame_sep F1 [A1] ... end_video
                (Fk: frame k's placeholders; Ak: the audio-track patches whose
                time falls in [t_k, t_k+1), when the video tokenizer has
                include_audio)
    image_code  begin_image  code ids (discrete, predicted)  end_image
                (also a predicted image: its codes, see above)

Per-token arrays (T = number of tokens):
  modality   how the embedding at i is made: 1/2/3 image/audio/video for
             placeholders (a patch embedding is scattered there), 4 for image
             codes, 0 for text AND for every marker / separator / bos / eos
             (they are ordinary rows of the embedding table).
  block_ids  1, 2, 3, ... one id per image, per audio clip, per video frame and
             per audio chunk of a video (bidirectional attention inside); 0 for
             everything else, markers included (they stay causal).
  positions  (t, h, w) M-RoPE (Qwen2-VL). Let `next` = 1 + the largest
             position used so far (0 at the start). A text-like token (text,
             marker, bos/eos, 1-D image codes) gets (next, next, next). A block
             starts at st = next:
               image / 2-D codes  (st, st + row, st + col)
               audio              (st + tau, st + band, st + band)
               video frame k      (st + tau_k, st + row, st + col)
               video audio chunk  (st + tau, st + band, st + band)
               frame_sep before k (st + tau_k) on all three axes
             where tau are time positions (audio tokenizer units, 25/s by
             default) and st is shared by a whole video so that its frames and
             its audio stay on one time axis. After a block text resumes at
             (max position used so far) + 1.
  targets    targets[i] = tokens[i + 1]; targets[T - 1] = pad.
  loss_weights  weight of predicting token i + 1 at position i: w(kind) of the
             segment that token belongs to when that segment has predict=True
             and the token is discrete (never a placeholder); 0 otherwise; 0 at
             T - 1. eos belongs to the last segment; bos is never a target.

Continuous inputs, per modality m in (image, audio, video), always present:
  {m}_patches [P_m, D_m] float32 and {m}_slots [P_m] int32, the index in
  tokens of each patch's placeholder (ascending). Examples are self-contained:
  packing concatenates them, adds segment_ids and offsets the slots.

Training-time augmentation: `build(record, source, augment)` with an
augmenter (gemjax/data/augment.py `RecordAugment`: `image(pixels_HxWx3)`,
`audio(waveform, sample_rate)`, each returning a new array) changes media
inputs before they are patched: images and video frames as decoded pixels
(frames at their grid size), audio clips as waveforms at the tokenizer's
rate. Decoded pixels / waveforms are cached like tokens; the augmented
result never is. Predicted images, image codes and a video's audio track are
never augmented.

`collate` pads a list of examples (one per row, no packing) to a fixed T and
fixed per-modality patch budgets: the batch contract of gemjax/batch.py.

This module imports numpy, gemjax.errors, gemjax.batch and
gemjax.tokenizers; no JAX.
"""

from __future__ import annotations

import collections
import dataclasses

from typing import Any, Mapping, Sequence

import numpy as np

from gemjax.batch import (AUDIO, CONTINUOUS_MODALITIES, IMAGE, IMAGE_CODE, TEXT,
                          VIDEO, empty_batch, patch_keys, validate_batch)
from gemjax.errors import BadInputError
from gemjax.tokenizers.audio import AudioTokenizer, AudioTokens
from gemjax.tokenizers.image import ImageTokenizer
from gemjax.tokenizers.text import TextTokenizer
from gemjax.tokenizers.video import VideoTokenizer
from gemjax.tokenizers.vocab import VocabLayout

SEGMENT_KINDS = ('text', 'image', 'audio', 'video', 'image_code')
_KIND_ALIASES = {'image_codes': 'image_code'}
DEFAULT_LOSS_WEIGHTS = {'text': 1.0, 'image': 1.0, 'audio': 1.0, 'video': 1.0,
                        'image_code': 1.0}


class _Sequence:
  """Growing per-token arrays of one example."""

  def __init__(self, layout: VocabLayout, patch_dims: Mapping[str, int]):
    self.layout = layout
    self.tokens: list[np.ndarray] = []
    self.modality: list[np.ndarray] = []
    self.positions: list[np.ndarray] = []
    self.block_ids: list[np.ndarray] = []
    self.weights: list[np.ndarray] = []  # weight of predicting this token
    self.patches = {m: [] for m in CONTINUOUS_MODALITIES}
    self.slots = {m: [] for m in CONTINUOUS_MODALITIES}
    self.patch_dims = dict(patch_dims)
    self.length = 0
    self.max_pos = -1
    self.num_blocks = 0

  @property
  def next_pos(self) -> int:
    return self.max_pos + 1

  def _append(self, tokens, modality: int, positions_Nx3, block_id: int, weight: float):
    n = len(tokens)
    if not n:
      return
    self.tokens.append(np.asarray(tokens, np.int32))
    self.modality.append(np.full(n, modality, np.int8))
    self.positions.append(np.asarray(positions_Nx3, np.int32).reshape(n, 3))
    self.block_ids.append(np.full(n, block_id, np.int32))
    self.weights.append(np.full(n, weight, np.float32))
    self.length += n
    self.max_pos = max(self.max_pos, int(self.positions[-1].max()))

  def text_like(self, ids, weight: float, modality: int = TEXT):
    """Tokens on the text diagonal: (next, next, next), +1 each."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    p = self.next_pos + np.arange(len(ids), dtype=np.int32)
    self._append(ids, modality, np.stack([p, p, p], axis=-1), 0, weight)

  def at(self, token: int, pos: int, weight: float):
    """One text-modality token at an explicit position (a frame separator)."""
    self._append([token], TEXT, [[pos, pos, pos]], 0, weight)

  def new_block(self) -> int:
    self.num_blocks += 1
    return self.num_blocks

  def patch_block(self, m: str, patches_NxD: np.ndarray, positions_Nx3: np.ndarray,
                  block_id: int):
    """Placeholders for continuous patches of modality m, one block."""
    n = patches_NxD.shape[0]
    code = {'image': IMAGE, 'audio': AUDIO, 'video': VIDEO}[m]
    self.slots[m].append(self.length + np.arange(n, dtype=np.int32))
    self.patches[m].append(np.asarray(patches_NxD, np.float32))
    self._append(np.full(n, self.layout.placeholder, np.int32), code, positions_Nx3,
                 block_id, 0.0)

  def finish(self) -> dict[str, np.ndarray]:
    tokens = np.concatenate(self.tokens)
    weights_self = np.concatenate(self.weights)
    targets = np.full_like(tokens, self.layout.pad)
    targets[:-1] = tokens[1:]
    loss_weights = np.zeros_like(weights_self)
    loss_weights[:-1] = weights_self[1:]
    out = {
        'tokens': tokens,
        'modality': np.concatenate(self.modality),
        'positions': np.concatenate(self.positions),
        'block_ids': np.concatenate(self.block_ids),
        'targets': targets,
        'loss_weights': loss_weights,
    }
    for m in CONTINUOUS_MODALITIES:
      pk, sk = patch_keys(m)
      d = self.patch_dims[m]
      out[pk] = (np.concatenate(self.patches[m]) if self.patches[m]
                 else np.zeros((0, d), np.float32))
      out[sk] = (np.concatenate(self.slots[m]) if self.slots[m]
                 else np.zeros((0,), np.int32))
    return out


_SEEN_ONCE_MAX = 1 << 18   # input hashes remembered for cache admission (~16 MB)


def _arrays(obj) -> list[np.ndarray]:
  """The numpy arrays held by a tokens dataclass (one level of nesting)."""
  if isinstance(obj, np.ndarray):
    return [obj]
  out = []
  for v in vars(obj).values():
    if isinstance(v, np.ndarray):
      out.append(v)
    elif isinstance(v, (list, tuple)):
      out.extend(x for x in v if isinstance(x, np.ndarray))
      out.extend(a for x in v if dataclasses.is_dataclass(x) for a in _arrays(x))
    elif dataclasses.is_dataclass(v):
      out.extend(_arrays(v))
  return out


def _audio_positions(st: int, audio: AudioTokens) -> np.ndarray:
  t = st + audio.time_positions
  b = st + audio.bands
  return np.stack([t, b, b], axis=-1)


def _grid_positions(st: int, t_offset: int, positions_Nx2: np.ndarray) -> np.ndarray:
  n = positions_Nx2.shape[0]
  return np.stack([np.full(n, st + t_offset), st + positions_Nx2[:, 0],
                   st + positions_Nx2[:, 1]], axis=-1)


class SequenceBuilder:
  """Turns records into unbatched examples (see the module docstring).

  Args:
    text_tokenizer: anything with `encode(str) -> int32 ids` and `.layout`.
    image, audio, video: tokenizer settings (defaults: the tokenizers' own;
      the default video tokenizer shares `audio`).
    loss_weights: per segment kind ('text', 'image', 'audio', 'video',
      'image_code'); missing kinds weigh 1.0.
    add_bos, add_eos: wrap each example in the layout's bos / eos.
    max_length: records longer than this many tokens are bad input.
    media_cache_mb: per-process LRU cache of tokenized media and image codes.
      An input is cached the second time it is seen, so media used once (a
      video composed for one example) never evict the corpus.
    image_codes: discrete image tokenizer for predicted images (anything with
      `num_codes` and `encode(uint8 [H, W] or [H, W, C]) -> int [h, w]`);
      its codes must fit the text tokenizer's layout (num_image_codes).
  """

  def __init__(self, text_tokenizer: TextTokenizer, *,
               image: ImageTokenizer | None = None,
               audio: AudioTokenizer | None = None,
               video: VideoTokenizer | None = None,
               loss_weights: Mapping[str, float] | None = None,
               add_bos: bool = True, add_eos: bool = True,
               max_length: int | None = None, media_cache_mb: float = 0,
               image_codes: Any = None):
    self.text = text_tokenizer
    self.layout: VocabLayout = text_tokenizer.layout
    self.image = image or ImageTokenizer()
    self.audio = audio or AudioTokenizer()
    self.video = video or VideoTokenizer(audio=self.audio)
    if self.video.include_audio and (
        self.video.audio.patch_dim != self.audio.patch_dim):
      raise ValueError(f'SequenceBuilder: the video tokenizer\'s audio patches '
                       f'({self.video.audio.patch_dim}) must match audio_patches '
                       f'({self.audio.patch_dim})')
    if self.video.positions_per_second != self.audio.positions_per_second:
      raise ValueError(f'SequenceBuilder: audio and video must share one time '
                       f'unit; positions_per_second {self.audio.positions_per_second} '
                       f'vs {self.video.positions_per_second}')
    unknown = set(loss_weights or {}) - set(SEGMENT_KINDS)
    if unknown:
      raise ValueError(f'SequenceBuilder: loss_weights has unknown kinds '
                       f'{sorted(unknown)}; valid: {SEGMENT_KINDS}')
    self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
    self.add_bos, self.add_eos = add_bos, add_eos
    self.max_length = max_length
    if image_codes is not None and int(image_codes.num_codes) > self.layout.num_image_codes:
      raise ValueError(f'SequenceBuilder: the image code tokenizer has '
                       f'{image_codes.num_codes} codes but the text tokenizer\'s layout '
                       f'reserves {self.layout.num_image_codes} (build it with '
                       f'num_image_codes={image_codes.num_codes})')
    self.image_codes = image_codes
    # Tokenized media by content, least recently used first out: a small
    # corpus seen for many epochs (or composed pairs reusing the same clips)
    # decodes each file once per process. 0 = off.
    self.media_cache_mb = media_cache_mb
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cache_bytes = 0
    self._seen_once: set[int] = set()   # hashes of inputs seen once, not cached

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_cache'], state['_cache_bytes'] = collections.OrderedDict(), 0   # per process
    state['_seen_once'] = set()
    return state

  def _tokenize(self, kind: str, fn, data, *args, **kwargs):
    """fn(data, ...) through the media cache (identical results, decoded once)."""
    if self.media_cache_mb <= 0 or not isinstance(data, bytes):
      return fn(data, *args, **kwargs)
    key = (kind, data, tuple(sorted(kwargs.items())))
    hit = self._cache.get(key)
    if hit is not None:
      self._cache.move_to_end(key)
      return hit[0]
    tokens = fn(data, *args, **kwargs)
    h = hash(key)
    if h not in self._seen_once:
      if len(self._seen_once) >= _SEEN_ONCE_MAX:
        self._seen_once.clear()
      self._seen_once.add(h)
      return tokens
    self._seen_once.discard(h)
    arrays = _arrays(tokens)
    for v in arrays:
      v.flags.writeable = False          # shared between examples: never mutated
    size = len(data) + sum(v.nbytes for v in arrays)
    self._cache[key] = (tokens, size)
    self._cache_bytes += size
    while self._cache_bytes > self.media_cache_mb * 2 ** 20 and len(self._cache) > 1:
      self._cache_bytes -= self._cache.popitem(last=False)[1][1]
    return tokens

  @property
  def patch_dims(self) -> dict[str, int]:
    return {'image': self.image.patch_dim, 'audio': self.audio.patch_dim,
            'video': self.video.patch_dim}

  def build(self, record: Mapping[str, Any], source: str = '<record>',
            augment: Any = None) -> dict[str, np.ndarray]:
    """One record -> one unbatched example dict; BadInputError on bad input.
    `augment`: a per-record augmenter (module docstring), or None."""
    segments = self._check_record(record, source)
    seq = _Sequence(self.layout, self.patch_dims)
    if self.add_bos:
      seq.text_like([self.layout.bos], 0.0)
    last_weight = 0.0
    for i, seg in enumerate(segments):
      kind, predict = self._check_segment(seg, i, source)
      seg_source = f'{source}:segments[{i}]'
      add = kind
      if kind == 'image' and predict:   # an image to draw: its discrete codes
        kind, add = 'image_code', 'predicted_image'
      w = float(self.loss_weights[kind]) if predict else 0.0
      try:
        getattr(self, f'_add_{add}')(seq, seg, w, seg_source, augment)
      except BadInputError:
        raise
      except Exception as e:  # a library failed in a way we did not foresee
        raise BadInputError(kind, seg_source, f'{type(e).__name__}: {e}') from e
      last_weight = w
    if self.add_eos:
      seq.text_like([self.layout.eos], last_weight)
    if seq.length == 0:
      raise BadInputError('record', source, 'record produced no tokens')
    if self.max_length is not None and seq.length > self.max_length:
      raise BadInputError('record', source, f'{seq.length} tokens is more than '
                          f'max_length={self.max_length}')
    return seq.finish()

  def _check_record(self, record, source: str) -> list:
    if not isinstance(record, Mapping) or 'segments' not in record:
      raise BadInputError('record', source, "expected a dict with a 'segments' list")
    segments = record['segments']
    if not isinstance(segments, (list, tuple)) or not segments:
      raise BadInputError('record', source, "'segments' must be a non-empty list")
    return list(segments)

  def _check_segment(self, seg, i: int, source: str) -> tuple[str, bool]:
    where = f'{source}:segments[{i}]'
    if not isinstance(seg, Mapping):
      raise BadInputError('record', where, f'segment is a {type(seg).__name__}, '
                          f'expected a dict')
    kind = _KIND_ALIASES.get(seg.get('kind'), seg.get('kind'))
    if kind not in SEGMENT_KINDS:
      raise BadInputError('record', where, f'kind {seg.get("kind")!r}; valid: '
                          f'{SEGMENT_KINDS}')
    predict = seg.get('predict', kind == 'text')
    if not isinstance(predict, (bool, np.bool_)):
      raise BadInputError('record', where, f'predict must be a bool, got {predict!r}')
    field = {'text': 'text', 'image_code': 'codes'}.get(kind, 'data')
    if seg.get(field) is None:
      raise BadInputError(kind, where, f'{kind} segment has no {field!r}')
    return kind, bool(predict)

  # One method per segment kind; each appends its tokens to `seq`.

  def _add_text(self, seq: _Sequence, seg, w: float, source: str, augment=None):
    seq.text_like(self.text.encode(seg['text'], source=source), w)

  def _pixels(self, data, source: str) -> np.ndarray:
    return np.asarray(self.image.decode(data, source))

  def _add_image(self, seq: _Sequence, seg, w: float, source: str, augment=None):
    if augment is None:
      tokens = self._tokenize('image', self.image.tokenize, seg['data'], source)
    else:
      pixels = self._tokenize('pixels', self._pixels, seg['data'], source)
      tokens = self.image.tokenize(augment.image(pixels), source)
    seq.text_like([self.layout.begin_image], w)
    st = seq.next_pos
    seq.patch_block('image', tokens.patches, _grid_positions(st, 0, tokens.positions),
                    seq.new_block())
    seq.text_like([self.layout.end_image], w)

  def _add_audio(self, seq: _Sequence, seg, w: float, source: str, augment=None):
    if augment is None:
      tokens = self._tokenize('audio', self.audio.tokenize, seg['data'], source,
                              sample_rate=seg.get('sample_rate'))
    else:
      y = self._tokenize('waveform', self.audio.load, seg['data'], source,
                         sample_rate=seg.get('sample_rate'))
      tokens = self.audio.tokenize_waveform(augment.audio(y, self.audio.sample_rate), source)
    seq.text_like([self.layout.begin_audio], w)
    seq.patch_block('audio', tokens.patches, _audio_positions(seq.next_pos, tokens),
                    seq.new_block())
    seq.text_like([self.layout.end_audio], w)

  def _add_video(self, seq: _Sequence, seg, w: float, source: str, augment=None):
    if augment is None:
      video = self._tokenize('video', self.video.tokenize, seg['data'], source,
                             frame_rate=seg.get('frame_rate'))
    else:   # decoded once (cached), each use augmented afresh
      decoded = self._tokenize('video_pixels', self.video.decode, seg['data'], source,
                               frame_rate=seg.get('frame_rate'))
      video = self.video.tokenize_decoded(decoded, augment.image)
    seq.text_like([self.layout.begin_video], w)
    st = seq.next_pos
    tau = video.time_positions
    chunk_of = None
    if video.audio is not None and video.audio.num_tokens:
      # Audio patch -> the frame whose [t_k, t_k+1) holds its time.
      chunk_of = np.clip(np.searchsorted(video.times, video.audio.times, side='right') - 1,
                         0, video.num_frames - 1)
    for k, frame in enumerate(video.frames):
      if k:
        seq.at(self.layout.frame_sep, st + int(tau[k]), w)
      seq.patch_block('video', frame.patches,
                      _grid_positions(st, int(tau[k]), frame.positions), seq.new_block())
      if chunk_of is not None and np.any(chunk_of == k):
        chunk = video.audio.select(chunk_of == k)
        seq.patch_block('audio', chunk.patches, _audio_positions(st, chunk),
                        seq.new_block())
    seq.text_like([self.layout.end_video], w)

  def _encode_codes(self, data, source: str) -> np.ndarray:
    pixels = np.asarray(self.image.decode(data, source))   # RGB uint8 [H, W, 3]
    return np.asarray(self.image_codes.encode(pixels), np.int32)

  def _add_predicted_image(self, seq: _Sequence, seg, w: float, source: str, augment=None):
    if self.image_codes is None:
      raise BadInputError('image', source, 'an image with predict=True is trained as '
                          'discrete image codes, and this builder has no image code '
                          'tokenizer: set data.image_codes (a saved ImageCodeTokenizer '
                          'directory), or mark the image predict=False')
    codes = self._tokenize('image_code', self._encode_codes, seg['data'], source)
    self._add_image_code(seq, {'codes': codes}, w, source)

  def _add_image_code(self, seq: _Sequence, seg, w: float, source: str, augment=None):
    codes = np.asarray(seg['codes'])
    if codes.ndim not in (1, 2) or codes.size == 0 or not np.issubdtype(codes.dtype, np.integer):
      raise BadInputError('image_code', source, f'codes must be a non-empty [n] or '
                          f'[h, w] int array, got {codes.dtype} {codes.shape}')
    if codes.min() < 0 or codes.max() >= self.layout.num_image_codes:
      raise BadInputError('image_code', source, f'codes outside [0, '
                          f'{self.layout.num_image_codes}) (VocabLayout.num_image_codes)')
    ids = self.layout.image_code_id(codes)
    seq.text_like([self.layout.begin_image], w)
    if codes.ndim == 1:
      seq.text_like(ids, w, modality=IMAGE_CODE)
    else:
      h, wd = codes.shape
      rr, cc = np.meshgrid(np.arange(h), np.arange(wd), indexing='ij')
      pos = _grid_positions(seq.next_pos, 0, np.stack([rr.ravel(), cc.ravel()], -1))
      seq._append(ids.reshape(-1), IMAGE_CODE, pos, 0, w)
    seq.text_like([self.layout.end_image], w)

  def collate(self, examples: Sequence[Mapping[str, np.ndarray]], seq_len: int,
              patch_budgets: Mapping[str, int], *, truncate: bool = False) -> dict[str, np.ndarray]:
    """`collate` with this builder's pad id."""
    return collate(examples, seq_len, patch_budgets, pad_id=self.layout.pad,
                   truncate=truncate)


def collate(examples: Sequence[Mapping[str, np.ndarray]], seq_len: int,
            patch_budgets: Mapping[str, int], *, pad_id: int,
            truncate: bool = False) -> dict[str, np.ndarray]:
  """Pads examples (one per row, no packing) into a batch of the contract.

  Args:
    examples: outputs of `SequenceBuilder.build`.
    seq_len: T; rows are padded with pad_id (segment id 0, weight 0).
    patch_budgets: modality -> P_m for the modalities the batch carries;
      patch rows past an example's own are zeros with slot -1.
    pad_id: the layout's pad id.
    truncate: cut an example that does not fit (tokens past T and patches
      past the budget, cutting the tokens at the first dropped patch) instead
      of raising BadInputError.
  Returns:
    the batch dict, checked with `validate_batch`; segment_ids is 1 on every
    real token.
  """
  B, T = len(examples), int(seq_len)
  if B == 0:
    raise ValueError('collate: no examples')
  for m in patch_budgets:
    if m not in CONTINUOUS_MODALITIES:
      raise ValueError(f'collate: patch budget for {m!r}; valid: {CONTINUOUS_MODALITIES}')
  dims = {}
  for m in patch_budgets:
    pk, _ = patch_keys(m)
    sizes = {ex[pk].shape[1] for ex in examples if pk in ex}
    if len(sizes) > 1:
      raise ValueError(f'collate: examples disagree on the {m} patch size: {sizes}')
    dims[m] = sizes.pop() if sizes else 0
  batch = empty_batch(B, T, patch_budgets, dims, pad_id=pad_id)
  for b, ex in enumerate(examples):
    n = len(ex['tokens'])
    cut = n
    if n > T:
      cut = T
    for m in CONTINUOUS_MODALITIES:
      pk, sk = patch_keys(m)
      slots = ex.get(sk, np.zeros((0,), np.int32))
      budget = int(patch_budgets.get(m, 0))
      if len(slots) > budget:
        cut = min(cut, int(slots[budget]))
    if cut < n and not truncate:
      over = [f'{m} patches {len(ex[patch_keys(m)[1]])} > budget '
              f'{patch_budgets.get(m, 0)}' for m in CONTINUOUS_MODALITIES
              if len(ex.get(patch_keys(m)[1], ())) > patch_budgets.get(m, 0)]
      reason = ', '.join(([f'{n} tokens > seq_len {T}'] if n > T else []) + over)
      raise BadInputError('record', f'collate example {b}', f'does not fit: {reason}')
    for key in ('tokens', 'modality', 'positions', 'block_ids', 'targets', 'loss_weights'):
      batch[key][b, :cut] = ex[key][:cut]
    batch['segment_ids'][b, :cut] = 1
    if cut < n:  # the last kept token has no kept successor
      batch['targets'][b, cut - 1] = pad_id
      batch['loss_weights'][b, cut - 1] = 0.0
    for m in patch_budgets:
      pk, sk = patch_keys(m)
      if pk not in ex:
        continue
      keep = ex[sk] < cut
      k = int(keep.sum())
      batch[pk][b, :k] = ex[pk][keep]
      batch[sk][b, :k] = ex[sk][keep]
  validate_batch(batch, where='collate')
  return batch
