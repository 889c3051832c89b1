"""Shared inputs and references for the attention tests (unit and integration).

Not a test module: tests import it (`import support`; conftest.py puts tests/
on the path) instead of importing each other.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemjax.kernels import naive_attention
from gemjax.model.info import SequenceInfo

ATOL = 1e-5


def make_inputs(B=2, T=72, H=4, G=2, K=8, seed=0):
  """Packed rows (3 documents + padding), two bidirectional blocks, GQA."""
  rng = np.random.default_rng(seed)
  q, ct = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32) for _ in range(2))
  seg = np.ones((B, T), np.int32)
  seg[0, 30:] = 2
  seg[0, 50:] = 3
  seg[0, 66:] = 0          # padding
  seg[1, 41:] = 2
  blk = np.zeros((B, T), np.int32)
  blk[0, 5:17] = 1         # a block crossing chunk boundaries
  blk[1, 44:60] = 2
  idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  info = SequenceInfo(jnp.zeros((B, T, 3), jnp.int32), jnp.asarray(seg), jnp.asarray(blk),
                      jnp.asarray(idx), jnp.zeros((B, T), jnp.int8))
  return q, k, v, ct, info


def value_and_grads(kernel, causal, window):
  def f(q, k, v, ct, info):
    o = kernel(q, k, v, info, causal=causal, window=window)
    return jnp.sum(o * ct), o
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@functools.lru_cache(maxsize=None)
def dense_fn(causal, window):
  """The reference, compiled once per mask kind for every test module."""
  return value_and_grads(naive_attention, causal, window)


def assert_same(got, want):
  (_, o1), g1 = got
  (_, o0), g0 = want
  np.testing.assert_allclose(o1, o0, atol=ATOL)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, atol=ATOL)


def window_probe(T=32, window=5):
  """q = 0 (uniform weights over visible keys), v_j = one-hot(j): out[i, j]
  is 1/|visible(i)| exactly where key j is visible to query i."""
  q = jnp.zeros((1, T, 1, T), jnp.float32)
  k = jnp.zeros((1, T, 1, T), jnp.float32)
  v = jnp.eye(T, dtype=jnp.float32)[None, :, None, :]
  idx = jnp.arange(T, dtype=jnp.int32)[None]
  ones = jnp.ones((1, T), jnp.int32)
  info = SequenceInfo(jnp.zeros((1, T, 3), jnp.int32), ones, 0 * ones, idx,
                      jnp.zeros((1, T), jnp.int8))
  return q, k, v, info


def pretend_cuda(monkeypatch, backend: bool = False):
  """Lets this CPU host lower cuDNN attention for CUDA: JAX's trace-time GPU
  probes (cuDNN version, compute capability) are stubbed, as is gemjax's
  Hopper test; with `backend`, `jax.default_backend()` also says 'gpu' (undo
  it before running anything)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  from gemjax.kernels import platform
  monkeypatch.setattr(cudnn, 'check_cudnn_version', lambda: 90800)
  monkeypatch.setattr(cudnn, 'check_compute_capability', lambda c: True)
  monkeypatch.setattr(cudnn, 'is_cuda_compute_capability_equal', lambda c: False)
  monkeypatch.setattr(platform, 'hopper_or_later', lambda: True)
  if backend:
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')


def cudnn_calls(hlo: str) -> dict[str, int]:
  """cuDNN attention custom calls in lowered StableHLO text -> operand count."""
  import re
  return {m.group(1): m.group(2).count('%') for m in
          re.finditer(r'custom_call @(__cudnn\$\w+)\((.*?)\)', hlo)}


def sample_text(split: str = 'validation') -> list[str]:
  """The text segments of the sample corpus's text_lm records of `split`."""
  import glob
  import os
  from array_record.python.array_record_module import ArrayRecordReader
  from gemjax.data.records import decode_record
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (path,) = glob.glob(os.path.join(root, f'data/sample/{split}/text_lm-*.array_record'))
  reader = ArrayRecordReader(path)
  try:
    records = [decode_record(b, path) for b in reader.read_all()]
  finally:
    reader.close()
  return [s['text'] for r in records for s in r['segments'] if s['kind'] == 'text']
