"""Expert dispatch: send each routed token to its expert, run it, bring it back.

The MoE layer (gemjax/model/moe.py) decides *where* each token goes (the
router); this room does the moving. One call, `dispatch_combine`, takes the
tokens, their top-k expert ids and gate weights, the stacked expert weights and
two expert functions, and returns the gated sum of expert outputs per token.

Two compute paths, same interface:

  capacity  GShard / Switch style (Lepikhin et al. 2020; Fedus et al. 2021).
            Each sequence (row) is a group: every expert takes at most
            C = ceil(capacity_factor * T * k / E) of the row's assignments into
            a dense [E, C, D] buffer; one batched matmul per weight; overflow
            is dropped (the token then gets only its other experts, and the
            residual). First choices of the whole row have priority over second
            choices, then earlier tokens: the GShard order. Because groups are
            rows, what drops does not depend on how the batch is sharded
            (with the sequence split over `context`, a group is a device's
            chunk of the row).
  dropless  Sort assignments by expert and run a grouped matmul
            (`jax.lax.ragged_dot`, megablox-style kernels on TPU/GPU); nothing
            is dropped.

Expert parallelism: under a mesh whose `expert` axis is > 1 the work runs in a
`jax.shard_map` over every axis that splits tokens (data, fsdp, expert,
context). Expert e lives on expert-shard e // (E / P). The capacity path moves
its [P, E/P, C, D] buffer with one `all_to_all` each way; the dropless path
moves exactly the routed rows with `ragged_all_to_all` into a worst-case-sized
receive buffer (P * N * min(k, E/P) rows for N tokens per device on P expert
shards: 4x the N * k rows actually routed at nano-moe's 8 shards, top-2, 8
experts), and regroups them by local expert with index arithmetic (no second
sort). XLA:CPU has no ragged all-to-all: there it is emulated by a dense
`all_to_all` that pads every per-peer slice to the whole operand, P times the
traffic of the real exchange (8x on 8 emulated devices), so CPU timings of the
dropless expert-parallel path measure the emulation, not the real kernel. With no mesh, or where the batch does not split evenly, the same
per-device math runs on the whole batch.

If the mesh also splits the expert hidden dimension over `tensor`, the expert
functions return partial sums and are reduced here (their last matmul
contracts the hidden axis).

Imports jax, `gemjax.parallel.axes` and `gemjax.parallel.sharding` only.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemjax.parallel.axes import EXPERT_AXIS, TENSOR_AXIS, axis_size
from gemjax.parallel.sharding import current_mesh, logical_to_spec

PATHS = ('auto', 'capacity', 'dropless')


class ExpertFns(NamedTuple):
  """The expert computation in the two layouts the paths produce.

  batched(weights, x_ExMxD) -> y_ExMxD: expert e on the M rows of x[e].
  grouped(weights, x_MxD, group_sizes_E) -> y_MxD: rows sorted by expert,
    group_sizes_E of them per expert; rows past sum(group_sizes_E) are padding.
  `weights` is a tuple of arrays with a leading (local) expert axis.
  """
  batched: Callable[[Any, jax.Array], jax.Array]
  grouped: Callable[[Any, jax.Array, jax.Array], jax.Array]


def resolve_path(path: str) -> str:
  """'auto' -> 'capacity' on every backend.

  Dropless is opt-in: on CPU its ragged_dot is ~9x slower, and its
  expert-parallel exchange (the real `jax.lax.ragged_all_to_all`, GPU/TPU
  only) has not been run by this project, only the CPU emulation has. 'auto'
  will pick dropless on accelerators once that path is validated there.
  """
  if path not in PATHS:
    raise ValueError(f'MoE path {path!r} is invalid: one of {PATHS}')
  return 'capacity' if path == 'auto' else path


def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """C = ceil(capacity_factor * tokens * k / E), at least 1.

  Capped at `tokens_per_group`: the top-k experts of a token are distinct, so
  no expert can receive more than one assignment per token anyway.
  """
  c = math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)
  return max(1, min(c, tokens_per_group))


# ------------------------------------------------------------------ entry point


def dispatch_combine(x_BxTxD: jax.Array, expert_BxTxK: jax.Array, gate_BxTxK: jax.Array,
                     valid_BxT: jax.Array, weights: Sequence[jax.Array],
                     weight_names: Sequence[Sequence[str | None]], fns: ExpertFns, *,
                     num_experts: int, path: str = 'auto', capacity_factor: float = 1.25,
                     emulate_ragged: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """y[t] = sum_k gate[t, k] * expert_{e[t, k]}(x[t]), for kept assignments.

  Args:
    x_BxTxD: tokens (compute dtype).
    expert_BxTxK: int expert ids in [0, E); gate_BxTxK: their weights.
    valid_BxT: False for tokens that go to no expert (padding); they output 0.
    weights: stacked expert weights, leading axis E.
    weight_names: the logical axis names of each weight (for the map specs).
    fns: the expert computation (see `ExpertFns`).
    path: 'auto' | 'capacity' | 'dropless'.
    emulate_ragged: dropless + expert parallel only; None = emulate on CPU.

  Returns:
    (y_BxTxD, kept_BxTxK): outputs, and which assignments were computed
    (False where dropped for capacity or invalid).
  """
  path = resolve_path(path)
  if emulate_ragged is None:
    emulate_ragged = jax.default_backend() == 'cpu'
  weights = tuple(weights)
  kw = dict(fns=fns, num_experts=num_experts, path=path, capacity_factor=capacity_factor,
            emulate_ragged=emulate_ragged)
  mesh = current_mesh()
  if mesh is None or math.prod(mesh.shape.values()) == 1:
    return _per_device(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                       expert_shards=1, tensor_shards=1, **kw)

  sizes = dict(mesh.shape)
  ep = sizes.get(EXPERT_AXIS, 1)
  tp = sizes.get(TENSOR_AXIS, 1)
  if num_experts % ep:
    raise ValueError(f'{num_experts} experts cannot be split over mesh axis '
                     f"'{EXPERT_AXIS}' of size {ep}; make model.moe.num_experts a "
                     'multiple of mesh.expert')
  tok_spec = logical_to_spec(('batch', 'length', None), mesh)
  B, T = valid_BxT.shape
  if B % axis_size(sizes, tok_spec[0]) or T % axis_size(sizes, tok_spec[1]):
    # A batch that does not split over the token axes (e.g. batch-1 decoding):
    # run the one-device math and let the partitioner gather what it needs.
    return _per_device(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                       expert_shards=1, tensor_shards=1, **kw)
  # Inside the map weights keep only their expert/tensor split ('expert_map').
  w_specs = tuple(logical_to_spec(n, mesh, rules='expert_map') for n in weight_names)
  tok2 = P(tok_spec[0], tok_spec[1])

  def body(x, e, g, v, w):
    return _per_device(x, e, g, v, w, expert_shards=ep, tensor_shards=tp, **kw)

  mapped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(tok_spec, tok_spec, tok_spec, tok2, w_specs),
      out_specs=(tok_spec, tok_spec))
  return mapped(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights)


def _per_device(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights, *, fns,
                num_experts, path, capacity_factor, emulate_ragged, expert_shards,
                tensor_shards):
  axis = EXPERT_AXIS if expert_shards > 1 else None
  if path == 'capacity':
    y, kept = _capacity(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                        fns.batched, num_experts=num_experts,
                        capacity_factor=capacity_factor, axis_name=axis,
                        num_shards=expert_shards)
  elif axis is None:
    y, kept = _dropless_local(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                              fns.grouped, num_experts=num_experts)
  else:
    y, kept = _dropless_expert_parallel(
        x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights, fns.grouped,
        num_experts=num_experts, axis_name=axis, num_shards=expert_shards,
        emulate=emulate_ragged)
  if tensor_shards > 1:
    y = jax.lax.psum(y, TENSOR_AXIS)
  return y, kept


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _count(ids: jax.Array, n: int, axis: int) -> jax.Array:
  """Occurrences of 0..n-1 along `axis` (ids >= n are not counted)."""
  return jnp.sum(jax.nn.one_hot(ids, n, dtype=jnp.int32), axis=axis)


def _combine(y_BxKxTxD: jax.Array, gate_BxTxK: jax.Array) -> jax.Array:
  return jnp.einsum('bktd,btk->btd', y_BxKxTxD, gate_BxTxK.astype(y_BxKxTxD.dtype))


# --------------------------------------------------------------- capacity path


def _capacity(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights, batched_fn, *,
              num_experts, capacity_factor, axis_name, num_shards):
  B, T, D = x_BxTxD.shape
  K = expert_BxTxK.shape[-1]
  E, A = num_experts, T * K
  C = expert_capacity(T, E, K, capacity_factor)
  # k-major flattening (a = k * T + t): all first choices of the row sort
  # before any second choice. Invalid tokens get expert E: they sort last and
  # take no slot.
  e_BxA = jnp.where(valid_BxT[:, None, :], jnp.swapaxes(expert_BxTxK, 1, 2), E).reshape(B, A)
  order_BxA = jnp.argsort(e_BxA, axis=1, stable=True)
  counts_BxE = _count(e_BxA, E, axis=1)
  starts_BxE = _exclusive_cumsum(counts_BxE)

  # Slot (e, c) holds the c-th assignment (in priority order) routed to e.
  c_C = jnp.arange(C, dtype=jnp.int32)
  rank_BxExC = starts_BxE[:, :, None] + c_C
  filled_BxExC = c_C < counts_BxE[:, :, None]
  rank_BxS = jnp.clip(rank_BxExC.reshape(B, E * C), 0, A - 1)
  token_BxS = jnp.take_along_axis(order_BxA, rank_BxS, axis=1) % T
  buf_BxSxD = jnp.take_along_axis(x_BxTxD, token_BxS[..., None], axis=1)
  buf_BxSxD = jnp.where(filled_BxExC.reshape(B, E * C, 1), buf_BxSxD, 0)
  buf_BxExCxD = buf_BxSxD.reshape(B, E, C, D)

  if axis_name is None:
    h_ExMxD = jnp.swapaxes(buf_BxExCxD, 0, 1).reshape(E, B * C, D)
    y_ExMxD = batched_fn(weights, h_ExMxD)
    y_BxExCxD = jnp.swapaxes(y_ExMxD.reshape(E, B, C, D), 0, 1)
  else:
    Ps, El = num_shards, E // num_shards
    # [B, E, C, D] -> [P_owner, B, E_l, C, D] -> exchange -> [P_source, B, E_l, C, D]
    send = buf_BxExCxD.reshape(B, Ps, El, C, D).transpose(1, 0, 2, 3, 4)
    recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)
    h_ElxMxD = recv.transpose(2, 0, 1, 3, 4).reshape(El, Ps * B * C, D)
    y_ElxMxD = batched_fn(weights, h_ElxMxD)
    back = y_ElxMxD.reshape(El, Ps, B, C, D).transpose(1, 2, 0, 3, 4)
    back = jax.lax.all_to_all(back, axis_name, 0, 0, tiled=True)
    y_BxExCxD = back.transpose(1, 0, 2, 3, 4).reshape(B, E, C, D)

  # Each assignment reads its slot back: position = its rank among the
  # assignments to the same expert.
  rank_BxA = jnp.argsort(order_BxA, axis=1)
  e_safe_BxA = jnp.minimum(e_BxA, E - 1)
  pos_BxA = rank_BxA - jnp.take_along_axis(starts_BxE, e_safe_BxA, axis=1)
  kept_BxA = (e_BxA < E) & (pos_BxA < C)
  slot_BxA = e_safe_BxA * C + jnp.clip(pos_BxA, 0, C - 1)
  y_BxAxD = jnp.take_along_axis(y_BxExCxD.reshape(B, E * C, D), slot_BxA[..., None], axis=1)
  y_BxAxD = jnp.where(kept_BxA[..., None], y_BxAxD, 0)
  y_BxTxD = _combine(y_BxAxD.reshape(B, K, T, D), gate_BxTxK)
  kept_BxTxK = jnp.swapaxes(kept_BxA.reshape(B, K, T), 1, 2)
  return y_BxTxD, kept_BxTxK


# --------------------------------------------------------------- dropless path


def _sorted_assignments(expert_BxTxK, valid_BxT, num_experts):
  """Token-major flat assignments (a = n * K + k), sorted by expert."""
  B, T, K = expert_BxTxK.shape
  e_A = jnp.where(valid_BxT[..., None], expert_BxTxK, num_experts).reshape(B * T * K)
  order_A = jnp.argsort(e_A, stable=True)
  return e_A, order_A


def _unsort_and_combine(y_sorted_AxD, e_A, order_A, gate_BxTxK, num_experts):
  B, T, K = gate_BxTxK.shape
  D = y_sorted_AxD.shape[-1]
  y_AxD = jnp.take(y_sorted_AxD, jnp.argsort(order_A), axis=0)
  kept_A = e_A < num_experts
  y_AxD = jnp.where(kept_A[:, None], y_AxD, 0)
  y_BxKxTxD = jnp.swapaxes(y_AxD.reshape(B, T, K, D), 1, 2)
  return _combine(y_BxKxTxD, gate_BxTxK), kept_A.reshape(B, T, K)


def _dropless_local(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights, grouped_fn, *,
                    num_experts):
  B, T, D = x_BxTxD.shape
  K = expert_BxTxK.shape[-1]
  e_A, order_A = _sorted_assignments(expert_BxTxK, valid_BxT, num_experts)
  x_sorted_AxD = jnp.take(x_BxTxD.reshape(B * T, D), order_A // K, axis=0)
  sizes_E = _count(e_A, num_experts, axis=0)
  y_sorted_AxD = grouped_fn(weights, x_sorted_AxD, sizes_E)
  return _unsort_and_combine(y_sorted_AxD, e_A, order_A, gate_BxTxK, num_experts)


def _dropless_expert_parallel(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                              grouped_fn, *, num_experts, axis_name, num_shards, emulate):
  B, T, D = x_BxTxD.shape
  K = expert_BxTxK.shape[-1]
  N, Ps = B * T, num_shards
  E, El = num_experts, num_experts // num_shards
  A = N * K
  e_A, order_A = _sorted_assignments(expert_BxTxK, valid_BxT, E)
  send_AxD = jnp.take(x_BxTxD.reshape(N, D), order_A // K, axis=0)

  # Sizes: sorted by global expert, the rows for shard p are contiguous.
  counts_PxEl = _count(e_A, E, axis=0).reshape(Ps, El)
  send_P = counts_PxEl.sum(1)
  send_off_P = _exclusive_cumsum(send_P)
  a2a = lambda v: jax.lax.all_to_all(v, axis_name, 0, 0, tiled=True)
  recv_counts_PxEl = a2a(counts_PxEl)         # row s: what source s sends me
  recv_P = recv_counts_PxEl.sum(1)
  recv_off_P = _exclusive_cumsum(recv_P)      # where source s lands here
  dest_off_P = a2a(recv_off_P)                # where my rows land on shard p
  back_off_P = a2a(send_off_P)                # where results land on source s

  # Worst case: every token of every source picks min(K, E_l) of my experts.
  R = Ps * N * min(K, El)
  recv_RxD = ragged_all_to_all(send_AxD, jnp.zeros((R, D), send_AxD.dtype), send_off_P,
                               send_P, dest_off_P, recv_P, axis_name=axis_name,
                               num_shards=Ps, emulate=emulate)

  # Arrival order is (source, local expert); the grouped matmul wants
  # (local expert, source). Both layouts are concatenations of the same
  # segments, so each row's place in the other follows from the segment sizes.
  c_flat = recv_counts_PxEl.reshape(-1)
  g_flat = recv_counts_PxEl.T.reshape(-1)
  start_arrival_PxEl = _exclusive_cumsum(c_flat).reshape(Ps, El)
  start_grouped_PxEl = _exclusive_cumsum(g_flat).reshape(El, Ps).T
  row_R = jnp.arange(R, dtype=jnp.int32)
  # grouped row q <- arrival row
  seg_q = jnp.minimum(jnp.searchsorted(jnp.cumsum(g_flat), row_R, side='right'), El * Ps - 1)
  el_q, src_q = seg_q // Ps, seg_q % Ps
  from_q = start_arrival_PxEl[src_q, el_q] + row_R - start_grouped_PxEl[src_q, el_q]
  total = c_flat.sum()
  from_q = jnp.where(row_R < total, from_q, row_R)
  x_grouped_RxD = jnp.take(recv_RxD, from_q, axis=0)
  y_grouped_RxD = grouped_fn(weights, x_grouped_RxD, recv_counts_PxEl.sum(0))
  # arrival row r <- grouped row
  seg_r = jnp.minimum(jnp.searchsorted(jnp.cumsum(c_flat), row_R, side='right'), El * Ps - 1)
  src_r, el_r = seg_r // El, seg_r % El
  from_r = start_grouped_PxEl[src_r, el_r] + row_R - start_arrival_PxEl[src_r, el_r]
  from_r = jnp.where(row_R < total, from_r, row_R)
  y_arrival_RxD = jnp.take(y_grouped_RxD, from_r, axis=0)

  y_sorted_AxD = ragged_all_to_all(y_arrival_RxD, jnp.zeros((A, D), y_arrival_RxD.dtype),
                                   recv_off_P, recv_P, back_off_P, send_P,
                                   axis_name=axis_name, num_shards=Ps, emulate=emulate)
  return _unsort_and_combine(y_sorted_AxD, e_A, order_A, gate_BxTxK, E)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                      recv_sizes, *, axis_name, num_shards: int, emulate: bool):
  """`jax.lax.ragged_all_to_all` (one slice per peer), or a padded emulation.

  XLA:CPU has no ragged-all-to-all; the emulation pads every per-peer slice
  to the whole operand length (M rows), exchanges [P, M] blocks with
  `all_to_all`, and scatters the rows into place. Same result; each device
  sends P * M rows where the real exchange sends at most M: fine for tests,
  not for timing.
  """
  if not emulate:
    output = jax.lax.pcast(output, axis_name, to='varying')
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axis_name)
  M, R = operand.shape[0], output.shape[0]
  i_M = jnp.arange(M, dtype=jnp.int32)
  src_PxM = jnp.clip(input_offsets[:, None] + i_M, 0, M - 1)
  ok_PxM = i_M < send_sizes[:, None]
  packed = jnp.where(ok_PxM[..., None], jnp.take(operand, src_PxM, axis=0), 0)
  recv = jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=True)
  at_P = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  dest_PxM = jnp.where(i_M < recv_sizes[:, None], at_P[:, None] + i_M, R)
  return output.at[dest_PxM.reshape(-1)].set(
      recv.reshape(num_shards * M, *operand.shape[1:]), mode='drop')
