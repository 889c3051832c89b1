"""A trained model that answers prompts: records in, text out.

    gen = Generator.from_checkpoint('runs/nano')          # or a config YAML
    [answer] = gen.generate([{'segments': [
        {'kind': 'image', 'data': 'digit.png'},
        {'kind': 'text', 'text': 'Which digit is this?'}]}])
    answer.text

`generate(model, prompts, ...)` is the same for a model already in memory
(with the run's `SequenceBuilder`). Prompts are batched as they come (each
row its own length), padded to a multiple of the batch shards of the mesh and
to lengths the attention kinds need (Infini segments, ring shards), laid out
for ring attention when the mesh splits the context, then decoded by one
jitted loop (`gemjax.inference.decode`). Imports train's restore helpers,
the data room's sequence builder and the inference modules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from gemjax.errors import BadInputError
from gemjax.inference import decode, multimodal
from gemjax.inference.decode import GREEDY, SamplingConfig
from gemjax.inference.prompts import PromptEncoder, bucket
from gemjax.parallel import layouts
from gemjax.parallel.axes import BATCH_AXES, CONTEXT_AXIS


@dataclasses.dataclass
class Answer:
  text: str
  tokens: list[int]        # generated ids, the stop token included if one came
  stopped: bool            # ended on a stop token (else ran out of max_new_tokens)


@dataclasses.dataclass
class MultimodalAnswer:
  text: str                 # the text pieces, joined
  pieces: list              # ('text', str) and ('image', uint8 [H, W, C] or codes) in order
  images: list              # decoded images, uint8 [H, W, C] (codes [h, w] without a decoder)
  codes: list               # int32 [h, w] code grid of each image
  tokens: list[int]         # generated ids, the stop token included if one came
  stopped: bool
  well_formed: bool         # every image block exactly H*W codes, then end_image


def pad_multiple(model_cfg, mesh) -> int:
  """Prompt lengths are rounded up to this: 16, Infini's segment, 2 x ring shards."""
  m = 16
  if model_cfg.attention == 'infini':
    m = math.lcm(m, model_cfg.infini.segment_len)
  n = dict(mesh.shape).get(CONTEXT_AXIS, 1) if mesh is not None else 1
  if n > 1:
    m = math.lcm(m, 2 * n)
  return m


def batch_rows(mesh) -> int:
  if mesh is None:
    return 1
  return math.prod(dict(mesh.shape).get(a, 1) for a in BATCH_AXES)


class Generator:
  """Prompt encoder + sampler of one model (see the module docstring)."""

  def __init__(self, sampler: decode.Sampler, encoder: PromptEncoder, *, multiple: int = 16,
               rows: int = 1, context: int = 1, layout: str = 'zigzag'):
    self.sampler, self.encoder = sampler, encoder
    self.multiple, self.rows = multiple, rows
    self.context, self.layout = context, layout
    self.encoder.pad_multiple = math.lcm(self.encoder.pad_multiple, multiple)

  @classmethod
  def from_config(cls, cfg, params, mdef, mesh) -> 'Generator':
    from gemjax.data.registry import sequence_builder
    encoder = PromptEncoder(sequence_builder(cfg))
    sampler = decode.Sampler(graphdef=mdef.graphdef, params=params, mesh=mesh)
    return cls(sampler, encoder, multiple=pad_multiple(cfg.model, mesh), rows=batch_rows(mesh),
               context=dict(mesh.shape).get(CONTEXT_AXIS, 1) if mesh is not None else 1,
               layout=cfg.mesh.context_layout)

  @classmethod
  def from_checkpoint(cls, config_or_checkpoint: str, overrides: Sequence[str] = ()):
    """A run directory, a step directory, or a config YAML (its train.run_dir)."""
    from gemjax.train.restore import load_for_eval, resolve_config
    path = str(config_or_checkpoint)
    if path.endswith(('.yaml', '.yml')):
      cfg = resolve_config(path, list(overrides))
    else:
      cfg = resolve_config(None, list(overrides) + [f'eval.checkpoint={path}'])
    params, mdef, mesh = load_for_eval(cfg)
    gen = cls.from_config(cfg, params, mdef, mesh)
    gen.config = cfg
    return gen

  def default_stops(self) -> tuple[int, ...]:
    return (self.encoder.layout.eos,)

  def _prepare(self, examples, max_new_tokens: int, max_len: int | None):
    rows = -(-len(examples) // self.rows) * self.rows
    batch, lengths = self.encoder.collate(examples, rows=rows)
    need = int(lengths.max()) + max_new_tokens - 1
    if max_len is None:
      # A bucket, like the prompt length (the cache's length is a compiled
      # shape): room for the padded prompt and max_new_tokens, whatever the
      # longest prompt of this batch.
      max_len = bucket(batch['tokens'].shape[1] + max_new_tokens - 1, self.multiple)
    max_len = -(-max_len // self.multiple) * self.multiple
    if need > max_len:
      worst = int(np.argmax(lengths))
      raise BadInputError('prompt', f'prompt {worst}', f'{int(lengths[worst])} tokens + '
                          f'max_new_tokens={max_new_tokens} need {need} cache slots, more '
                          f'than max_len={max_len}')
    if self.context > 1:
      batch = layouts.apply_layout(batch, self.layout, self.context)
    return batch, max_len

  def generate_ids(self, examples: Sequence[Mapping[str, np.ndarray]], *,
                   max_new_tokens: int = 32, sampling: SamplingConfig = GREEDY,
                   stop_tokens: Sequence[int] | None = None, rng: jax.Array | None = None,
                   max_len: int | None = None) -> decode.Generation:
    """Built examples (`encoder.example`) -> the jitted loop's output, all rows."""
    stops = self.default_stops() if stop_tokens is None else tuple(stop_tokens)
    batch, max_len = self._prepare(examples, max_new_tokens, max_len)
    return self.sampler.generate(batch, rng, max_new_tokens=max_new_tokens, max_len=max_len,
                                 sampling=sampling, stop_tokens=stops,
                                 pad_id=self.encoder.layout.pad)

  def generate(self, prompts: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 32,
               sampling: SamplingConfig = GREEDY, stop_tokens: Sequence[int] | None = None,
               rng: jax.Array | None = None, max_len: int | None = None) -> list[Answer]:
    examples = [self.encoder.example(p, f'prompt {i}') for i, p in enumerate(prompts)]
    stops = self.default_stops() if stop_tokens is None else tuple(stop_tokens)
    out = self.generate_ids(examples, max_new_tokens=max_new_tokens, sampling=sampling,
                            stop_tokens=stops, rng=rng, max_len=max_len)
    toks, lengths, stopped = (np.asarray(x) for x in out)
    answers = []
    for i in range(len(prompts)):
      ids = [int(t) for t in toks[i, :lengths[i]]]
      answers.append(Answer(self.encoder.decode(ids, stops), ids, bool(stopped[i])))
    return answers

  def stream(self, prompt: Mapping[str, Any], *, max_new_tokens: int = 32,
             sampling: SamplingConfig = GREEDY, stop_tokens: Sequence[int] | None = None,
             rng: jax.Array | None = None, max_len: int | None = None) -> Iterator[str]:
    """Yields the answer's text piece by piece as tokens are generated."""
    stops = self.default_stops() if stop_tokens is None else tuple(stop_tokens)
    batch, max_len = self._prepare([self.encoder.example(prompt)], max_new_tokens, max_len)
    ids: list[int] = []
    shown = ''
    for tok in self.sampler.stream(batch, rng, max_new_tokens=max_new_tokens, max_len=max_len,
                                   sampling=sampling, stop_tokens=stops):
      t = int(tok[0])
      if t in stops:
        return
      ids.append(t)
      text = self.encoder.decode(ids, stops)
      # Multi-byte characters arrive over several tokens: show complete ones.
      if not text.endswith('\ufffd') and text != shown:
        yield text[len(shown):]
        shown = text


  # Text and images.

  @property
  def image_codes(self):
    """The run's image-code tokenizer (None: the model cannot draw)."""
    return getattr(self.encoder.builder, 'image_codes', None)

  def image_blocks(self) -> multimodal.ImageBlocks:
    codes = self.image_codes
    if codes is None:
      raise BadInputError('config', 'data.image_codes', 'this model has no image-code '
                          'tokenizer, so it cannot generate images')
    return multimodal.ImageBlocks.from_layout(self.encoder.layout, codes.grid)

  def generate_multimodal(self, prompts: Sequence[Mapping[str, Any]], *,
                          max_new_tokens: int = 64, sampling: SamplingConfig = GREEDY,
                          guidance_scale: float | None = None,
                          stop_tokens: Sequence[int] | None = None,
                          rng: jax.Array | None = None,
                          max_len: int | None = None) -> list[MultimodalAnswer]:
    """Answers with text and images (constrained decoding; see
    gemjax/inference/multimodal.py). `guidance_scale` adds an unconditional
    twin of every prompt and mixes image-code logits u + s (c - u)."""
    blocks = self.image_blocks()
    n = len(prompts)
    if not n:
      raise ValueError('generate_multimodal: no prompts')
    examples = [self.encoder.example(p, f'prompt {i}') for i, p in enumerate(prompts)]
    rows = -(-n // self.rows) * self.rows
    examples += [examples[0]] * (rows - n)
    if guidance_scale is not None:
      uncond = [self.encoder.example(multimodal.unconditional_prompt(p),
                                     f'prompt {i} (unconditional)')
                for i, p in enumerate(prompts)]
      examples += uncond + [uncond[0]] * (rows - n)
    stops = self.default_stops() if stop_tokens is None else tuple(stop_tokens)
    batch, max_len = self._prepare(examples, max_new_tokens, max_len)
    out = multimodal.run_multimodal(self.sampler, batch, rng, blocks=blocks,
                                    max_new_tokens=max_new_tokens, max_len=max_len,
                                    sampling=sampling, guidance_scale=guidance_scale,
                                    stop_tokens=stops, pad_id=self.encoder.layout.pad)
    toks, lengths, stopped = (np.asarray(x) for x in out[:3])
    answers = []
    for i in range(n):
      ids = [int(t) for t in toks[i, :lengths[i]]]
      answers.append(self._answer(ids, blocks, stops, bool(stopped[i])))
    return answers

  def _answer(self, ids, blocks, stops, stopped) -> MultimodalAnswer:
    parts, ok = multimodal.split_pieces(ids, blocks, stops)
    grids = [p.codes for p in parts if p.kind == 'image' and p.codes is not None]
    decoder = self.image_codes
    images = list(decoder.decode(np.stack(grids))) if grids and hasattr(decoder, 'decode') \
        else list(grids)
    pieces, k = [], 0
    for p in parts:
      if p.kind == 'text':
        pieces.append(('text', self.encoder.decode(p.ids, stops)))
      elif p.codes is not None:
        pieces.append(('image', images[k]))
        k += 1
    text = ''.join(t for kind, t in pieces if kind == 'text')
    return MultimodalAnswer(text, pieces, images, grids, ids, stopped, ok)


def generate(model, prompts: Sequence[Mapping[str, Any]], max_new_tokens: int = 32,
             sampling: SamplingConfig = GREEDY, stop_tokens: Sequence[int] | None = None,
             rng: jax.Array | None = None, *, builder, mesh=None,
             max_len: int | None = None) -> list[Answer]:
  """Answers for prompt records from an NNX model in memory and the run's
  `SequenceBuilder` (`gemjax.data.registry.sequence_builder(cfg)`)."""
  sampler = decode.Sampler(model, mesh=mesh)
  gen = Generator(sampler, PromptEncoder(builder), rows=batch_rows(mesh))
  return gen.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                      stop_tokens=stop_tokens, rng=rng, max_len=max_len)
