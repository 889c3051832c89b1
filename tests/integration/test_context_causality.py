"""Under a sequence split over 'context', future tokens never reach past logits.

The trainer permutes every row by `mesh.context_layout` before splitting it
over 'context' (gemjax/parallel/layouts.py); a layer that works in array
order rather than by each token's original index would let an earlier token
see a later one. For every attention kind `validate_mesh` accepts on a
context=2 mesh, and every layout: perturb the tokens from `CUT` on, and the
logits before `CUT` (in original order) must not move. The model has one
sliding-window layer and one global layer (local_layers=1), and packed rows.
Infini-attention is rejected with a context split; the last test shows why.

One compiled forward per attention kind, shared by the layouts (a layout is
data: the permuted arrays and 'token_index').
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.parallel import layouts
from gemjax.parallel import sharding as shd
from gemjax.parallel.mesh import validate_mesh
from gemjax.train import state as S

T, B, CUT, CONTEXT = 32, 2, 13, 2
TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=64', 'model.local_layers=1', 'model.window=8',
        'model.attention_block=8', 'model.image_patch_dim=0', 'model.audio_patch_dim=0',
        'model.video_patch_dim=0', f'train.batch_size={B}', f'train.seq_len={T}',
        'mesh.data=1', f'mesh.context={CONTEXT}']


@functools.lru_cache(maxsize=None)
def _forward(kind: str, *extra: str):
  """(jitted logits fn, params, mesh) for a tiny model on a context=2 mesh."""
  cfg = load_config(None, TINY + [f'model.attention={kind}', *extra])
  mdef = S.model_def(cfg.model)
  sizes = {a: 1 for a in shd.MESH_AXES} | {'context': CONTEXT}
  mesh = shd.make_mesh(sizes, devices=jax.devices()[:CONTEXT])
  pshards = S.param_shardings(mdef, mesh)
  spec = mdef.spec
  with shd.use_mesh(mesh):
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(spec.build(nnx.Rngs(0)))),
                     out_shardings=pshards)()
  batch = _batch(np.zeros((B, T), np.int32), 'zigzag')
  bshards = S.batch_shardings(mesh, {k: v.ndim for k, v in batch.items()})

  def logits(params, batch):
    return nnx.merge(mdef.graphdef, params)(batch)[0]

  fn = jax.jit(logits, in_shardings=(pshards, bshards))
  return cfg, fn, params, mesh, bshards


def _batch(tokens, layout):
  """Row 0 one document; row 1 two packed documents and padding; laid out."""
  seg = np.ones((B, T), np.int32)
  seg[1, 20:] = 2
  seg[1, 29:] = 0
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  pos[1, 20:] -= 20
  batch = {'tokens': tokens.astype(np.int32), 'modality': np.zeros((B, T), np.int8),
           'positions': np.repeat(pos[:, :, None], 3, axis=2),
           'segment_ids': seg, 'block_ids': np.zeros((B, T), np.int32),
           'targets': np.roll(tokens, -1, axis=1).astype(np.int32),
           'loss_weights': (seg > 0).astype(np.float32)}
  return layouts.apply_layout(batch, layout, CONTEXT)


def _logits(kind, layout, tokens, *extra):
  _, fn, params, mesh, bshards = _forward(kind, *extra)
  batch = _batch(tokens, layout)
  with shd.use_mesh(mesh):
    out = fn(params, S.to_global(batch, bshards))
  perm = layouts.layout_permutation(T, CONTEXT, layout)
  return np.asarray(layouts.undo_layout(np.asarray(out), perm))


def _tokens_and_perturbed():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 64, size=(B, T))
  b = a.copy()
  b[:, CUT:] = (a[:, CUT:] + 1 + rng.integers(0, 62, size=(B, T - CUT))) % 64
  assert np.all(b[:, CUT:] != a[:, CUT:])
  return a, b


@pytest.mark.parametrize('layout', layouts.LAYOUTS)
@pytest.mark.parametrize('kind', ['ring', 'dense'])
def test_future_tokens_never_change_past_logits_under_context_split(kind, layout):
  cfg, *_ = _forward(kind)
  validate_mesh(cfg, CONTEXT)   # an accepted kind on this mesh
  a, b = _tokens_and_perturbed()
  la, lb = _logits(kind, layout, a), _logits(kind, layout, b)
  # Masked keys contribute exp(-inf) = 0 exactly; only the summation order
  # may differ, so the tolerance is f32 round-off.
  np.testing.assert_allclose(lb[:, :CUT], la[:, :CUT], atol=1e-6, rtol=0)
  assert np.abs(lb[:, CUT:] - la[:, CUT:]).max() > 1e-3   # the perturbation is seen
  # And the layout is only a layout: same logits as array order.
  np.testing.assert_allclose(la, _logits(kind, 'contiguous', a), atol=1e-5, rtol=0)


def test_infini_with_a_permuting_layout_would_leak_future_tokens():
  """Why `validate_mesh` rejects Infini-attention on a context split: its
  memory scan walks segments in array order, so under zigzag the segment of
  tokens 24..31 is folded into memory before tokens 8..15 read it."""
  extra = ('model.infini.segment_len=8',)
  cfg, *_ = _forward('infini', *extra)
  with pytest.raises(ConfigError, match=r"model.attention='infini' is invalid"):
    validate_mesh(cfg, CONTEXT)
  a, b = _tokens_and_perturbed()
  contiguous = [_logits('infini', 'contiguous', x, *extra) for x in (a, b)]
  np.testing.assert_allclose(contiguous[1][:, :CUT], contiguous[0][:, :CUT], atol=1e-6, rtol=0)
  la, lb = (_logits('infini', 'zigzag', x, *extra) for x in (a, b))
  assert np.abs(lb[:, :CUT] - la[:, :CUT]).max() > 1e-4   # the leak the check prevents
