"""The nano train step with `model.attention=cudnn`, lowered for CUDA on this
CPU host (no GPU here: JAX's trace-time GPU probes are stubbed,
`support.pretend_cuda`). Shows the whole model, not only the kernel, hands
cuDNN's packed-layout forward and backward call to the compiler in every
layer. Lowering only: which branch runs is decided per batch at run time,
and nano's multimodal batches (bidirectional blocks) would take 'blockwise'.
Running cuDNN is `bench/gpu_checks.py`'s job on a GPU machine."""

import jax
import jax.numpy as jnp

from gemjax.config import load_config
from gemjax.data.registry import make_iterator
from gemjax.train import state as S
from support import cudnn_calls, pretend_cuda


def test_nano_train_step_with_cudnn_lowers_to_cudnn_calls_in_every_layer(monkeypatch):
  cfg = load_config('configs/nano.yaml', ['model.attention=cudnn',
                                          'model.compute_dtype=bfloat16'])
  mdef = S.model_def(cfg.model)
  tx = S.make_optimizer(cfg.optimizer, 100, mdef.groups)
  batch = next(make_iterator(cfg, 'train'))
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': mdef.abstract_params,
           'opt_state': jax.eval_shape(tx.init, mdef.abstract_params)}
  step = S.make_train_step(mdef, tx, cfg.model, S.lr_schedule(cfg.optimizer, 100))
  with monkeypatch.context() as mp:
    pretend_cuda(mp, backend=True)
    hlo = jax.jit(step).trace(state, abstract(batch)).lower(
        lowering_platforms=('cuda',)).as_text()
  calls = cudnn_calls(hlo)
  assert set(calls) == {'__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward'}, calls
  n = cfg.model.num_layers
  assert hlo.count('custom_call @__cudnn$fmhaSoftmax(') == n
  assert hlo.count('custom_call @__cudnn$fmhaSoftmaxBackward(') == n
  # Packed layout: q, k, v, seqlens and offsets go to every forward call.
  assert hlo.count('PADDING_CAUSAL') == 2 * n
