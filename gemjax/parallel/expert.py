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
            chunk of the row). No sort and no one-hot dispatch tensor: an
            assignment's place in its expert's queue is a cumulative count
            over the row, and tokens move into the buffer and back by row
            gathers whose transposes are gathers too (`take_rows`,
            `combine_rows`): O(T k D) per row each way.
  dropless  Sort assignments by expert and run a grouped matmul
            (`jax.lax.ragged_dot`, megablox-style kernels on TPU/GPU); on one
            device (or with no `expert` axis) nothing is dropped.

Expert parallelism: under a mesh whose `expert` axis is > 1 the work runs in a
`jax.shard_map` over every axis that splits tokens (data, fsdp, expert,
context). Expert e lives on expert-shard e // (E / P). The capacity path moves
its [P, E/P, C, D] buffer with one `all_to_all` each way; the dropless path
moves exactly the routed rows with `ragged_all_to_all` into a receive buffer
of R rows and regroups them by local expert with index arithmetic (no second
sort). With N tokens per device on P expert shards:

  dropless_buffer_factor = 0 (default): R is the worst case,
      P * N * min(k, E/P) (every token of every source picks min(k, E/P) of
      this shard's experts), so nothing is ever dropped; at nano-moe's shapes
      (8 shards, top-2, 8 experts, N = 256) that is 2048 rows for the 512 a
      shard receives when routing is balanced.
  dropless_buffer_factor = f > 0: R = min(worst case, ceil(f * N * k)
      rounded up to a multiple of 8), f times the N * k rows of a perfectly
      balanced load (the analogue of capacity_factor). When more rows are
      routed to a shard than fit, it grants them max-min fairly: its arrivals
      come in (source, local expert) segments, and each segment keeps
      min(its rows, L) for the highest level L that fits, the rows left over
      going one each to the first segments (source-major) still wanting more;
      the same as handing out one row per segment per turn, round-robin, in
      segment order. A segment keeps its first rows in priority order: first
      choices in token order, then second choices, ... (GShard's order,
      within the segment). The grants go back to the sources with one more
      small `all_to_all`; each source sends only its kept rows, and kept and
      dropped assignments are reported like capacity drops (the `kept` mask;
      `moe_dropped` in gemjax/model/moe.py). With drops, what is dropped
      depends on how the batch is split over devices. The config accepts
      f = 0 or f >= 1: below 1 even a perfectly balanced load would drop.

XLA:CPU has no ragged all-to-all: there it is emulated by a dense `all_to_all`
that pads every per-peer slice to the whole operand, P times the traffic of
the real exchange (8x on 8 emulated devices), so CPU timings of the dropless
expert-parallel path measure the emulation, not the real kernel. With no mesh,
or where the batch does not split evenly, the same per-device math runs on the
whole batch (no receive buffer: nothing dropped, whatever the factor).

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
from gemjax.parallel.sharding import current_mesh, logical_to_spec, target_platform

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


def dropless_receive_rows(tokens: int, num_experts: int, top_k: int, num_shards: int,
                          buffer_factor: float = 0.0) -> int:
  """Rows R of a device's dropless receive buffer under expert parallelism.

  `tokens` (N) per device, P = `num_shards`. 0: the worst case
  P * N * min(k, E / P), nothing ever dropped; f > 0: min(worst case,
  ceil(f * N * k) rounded up to a multiple of 8), f times a balanced load.
  """
  if buffer_factor < 0:
    raise ValueError(f'dropless_buffer_factor={buffer_factor!r} is invalid: must be >= 0 '
                     '(0 = worst-case buffer)')
  worst = num_shards * tokens * min(top_k, num_experts // num_shards)
  if buffer_factor == 0:
    return worst
  return min(worst, -(-math.ceil(buffer_factor * tokens * top_k) // 8) * 8)


# ------------------------------------------------------------------ entry point


def dispatch_combine(x_BxTxD: jax.Array, expert_BxTxK: jax.Array, gate_BxTxK: jax.Array,
                     valid_BxT: jax.Array, weights: Sequence[jax.Array],
                     weight_names: Sequence[Sequence[str | None]], fns: ExpertFns, *,
                     num_experts: int, path: str = 'auto', capacity_factor: float = 1.25,
                     dropless_buffer_factor: float = 0.0,
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
    dropless_buffer_factor: dropless + expert parallel only: 0 = worst-case
      receive buffer, f > 0 = bounded by f x a balanced load, overflow dropped
      (`dropless_receive_rows`; the module docstring).
    emulate_ragged: dropless + expert parallel only; None = emulate when
      tracing for CPU (`sharding.target_platform`: a TPU topology compiled on a
      CPU host gets the real op).

  Returns:
    (y_BxTxD, kept_BxTxK): outputs, and which assignments were computed
    (False where dropped for capacity or the dropless buffer, or invalid).
  """
  path = resolve_path(path)
  if emulate_ragged is None:
    emulate_ragged = target_platform() == 'cpu'
  weights = tuple(weights)
  kw = dict(fns=fns, num_experts=num_experts, path=path, capacity_factor=capacity_factor,
            dropless_buffer_factor=dropless_buffer_factor, emulate_ragged=emulate_ragged)
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
                num_experts, path, capacity_factor, dropless_buffer_factor, emulate_ragged,
                expert_shards, tensor_shards):
  axis = EXPERT_AXIS if expert_shards > 1 else None
  if path == 'capacity':
    y, kept = _capacity(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                        fns.batched, num_experts=num_experts,
                        capacity_factor=capacity_factor, axis_name=axis,
                        num_shards=expert_shards,
                        tensor_axis=TENSOR_AXIS if tensor_shards > 1 else None)
  elif axis is None:
    y, kept = _dropless_local(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                              fns.grouped, num_experts=num_experts)
  else:
    y, kept = _dropless_expert_parallel(
        x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights, fns.grouped,
        num_experts=num_experts, axis_name=axis, num_shards=expert_shards,
        emulate=emulate_ragged, buffer_factor=dropless_buffer_factor)
  if tensor_shards > 1:
    y = jax.lax.psum(y, TENSOR_AXIS)
  return y, kept


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _count(ids: jax.Array, n: int, axis: int) -> jax.Array:
  """Occurrences of 0..n-1 along `axis` (ids >= n are not counted)."""
  return jnp.sum(jax.nn.one_hot(ids, n, dtype=jnp.int32), axis=axis)


def _combine(y_BxKxTxD: jax.Array, gate_BxTxK: jax.Array) -> jax.Array:
  # Multiplies and a K-term sum, not an einsum: XLA:CPU lowers 'bktd,btk->btd'
  # to B*T tiny batched dots (forward and backward).
  g_BxTxK = gate_BxTxK.astype(y_BxKxTxD.dtype)
  return _sum_of(y_BxKxTxD[:, k] * g_BxTxK[:, :, k, None] for k in range(g_BxTxK.shape[-1]))


# XLA:CPU hands reductions (`jnp.sum`) to a library kernel that is slow on
# short axes (a [N, K, D] -> [N, K] sum takes ~5x a fused loop); sums of a
# few slices, as below, fuse with their producers into one loop instead.


def _sum_of(terms):
  terms = list(terms)
  out = terms[0]
  for t in terms[1:]:
    out = out + t
  return out


def sum_last(x: jax.Array) -> jax.Array:
  """Sum over a short last axis by pairwise halving (fuses into one loop)."""
  while x.shape[-1] > 1:
    n, h = x.shape[-1], x.shape[-1] // 2
    y = x[..., :h] + x[..., h:2 * h]
    if n % 2:
      y = jnp.concatenate([y[..., :1] + x[..., 2 * h:], y[..., 1:]], axis=-1)
    x = y
  return x[..., 0]


@jax.custom_vjp
def take_rows(src_NxD: jax.Array, idx_MxJ: jax.Array, ok_MxJ: jax.Array,
              inv_NxL: jax.Array, inv_ok_NxL: jax.Array) -> jax.Array:
  """out[m] = sum_j ok[m, j] * src[idx[m, j]]: a masked row gather whose
  transpose is another gather.

  (inv, inv_ok) is the same map read the other way: row n of src is read by
  the out rows inv[n, l] where inv_ok[n, l]. The default transpose of a
  gather is a scatter-add (slow on XLA:CPU); here the backward pass is
  `take_rows` with the two maps swapped, a gather again (to every order of
  differentiation). Indices must be in range wherever they are used (masked
  ones too).
  """
  zero = jnp.zeros((), src_NxD.dtype)
  return _sum_of(jnp.where(ok_MxJ[:, j, None],
                           jnp.take(src_NxD, idx_MxJ[:, j], axis=0, mode='clip'), zero)
                 for j in range(idx_MxJ.shape[1]))


def _take_rows_fwd(src, idx, ok, inv, inv_ok):
  return take_rows(src, idx, ok, inv, inv_ok), (idx, ok, inv, inv_ok)


def _take_rows_bwd(res, g_MxD):
  idx, ok, inv, inv_ok = res
  return take_rows(g_MxD, inv, inv_ok, idx, ok), None, None, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def combine_rows(y_RxD: jax.Array, gate_NxK: jax.Array, slot_NxK: jax.Array,
                 kept_NxK: jax.Array, asg_R: jax.Array, filled_R: jax.Array) -> jax.Array:
  """y[n] = sum_k kept[n, k] * gate[n, k] * y_R[slot[n, k]]: read back and
  weigh each token's expert outputs in one fused gather-multiply-sum.

  Its transpose is a gather too: the filled row r belongs to assignment
  a = asg[r] (a = n * K + k), so dy_R[r] = gate[a] * dy[n]; the gate's
  cotangent is <y_R[slot[n, k]], dy[n]>. (An einsum 'bktd,btk->btd' here
  becomes B*T tiny batched dots on XLA:CPU, and autodiff of a gather is a
  scatter-add.) `gate` has y's dtype.
  """
  w_NxK = jnp.where(kept_NxK, gate_NxK, jnp.zeros((), gate_NxK.dtype))
  return _sum_of(jnp.take(y_RxD, slot_NxK[:, k], axis=0, mode='clip') * w_NxK[:, k, None]
                 for k in range(slot_NxK.shape[1]))


def _combine_rows_fwd(y_RxD, gate_NxK, slot_NxK, kept_NxK, asg_R, filled_R):
  out = combine_rows(y_RxD, gate_NxK, slot_NxK, kept_NxK, asg_R, filled_R)
  return out, (y_RxD, gate_NxK, slot_NxK, kept_NxK, asg_R, filled_R)


def _combine_rows_bwd(res, dy_NxD):
  y_RxD, gate_NxK, slot_NxK, kept_NxK, asg_R, filled_R = res
  K = gate_NxK.shape[-1]
  zero = jnp.zeros((), dy_NxD.dtype)
  g_R = jnp.take(gate_NxK.reshape(-1), asg_R, mode='clip')
  dyr_RxD = jnp.where(filled_R[:, None],
                      jnp.take(dy_NxD, asg_R // K, axis=0, mode='clip') * g_R[:, None], zero)
  rows_NxKxD = jnp.take(y_RxD, slot_NxK, axis=0, mode='clip')
  dgate_NxK = jnp.where(kept_NxK, sum_last(rows_NxKxD * dy_NxD[:, None, :]), zero)
  return dyr_RxD, dgate_NxK.astype(gate_NxK.dtype), None, None, None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


# --------------------------------------------------------------- capacity path


class CapacityRoute(NamedTuple):
  """Where each assignment of a row-group goes in the [B, E, C] slot grid.

  pos_BxTxK: its place in its expert's queue (GShard priority: all first
    choices of the row in token order, then all second choices, ...); an
    assignment is kept iff it is valid and pos < C.
  count_BxE: assignments routed to each expert (kept or not).
  """
  kept_BxTxK: jax.Array
  pos_BxTxK: jax.Array
  count_BxE: jax.Array


def capacity_route(expert_BxTxK: jax.Array, valid_BxT: jax.Array, num_experts: int,
                   capacity: int) -> CapacityRoute:
  """Queue positions by a cumulative count, no sort: the position of an
  assignment is how many assignments before it (in priority order) chose the
  same expert. Invalid (padding) tokens count for no expert."""
  B, T, K = expert_BxTxK.shape
  E = num_experts
  # k-major priority order a = k * T + t.
  e_BxA = jnp.swapaxes(expert_BxTxK, 1, 2).reshape(B, K * T)
  v_BxA = jnp.tile(valid_BxT, (1, K))
  hit_BxAxE = (e_BxA[..., None] == jnp.arange(E, dtype=e_BxA.dtype)) & v_BxA[..., None]
  cum_BxAxE = jnp.cumsum(hit_BxAxE.astype(jnp.int32), axis=1)
  pos_BxA = sum_last(jnp.where(hit_BxAxE, cum_BxAxE, 0)) - 1   # -1: invalid
  kept_BxA = v_BxA & (pos_BxA < capacity)
  to_btk = lambda a: jnp.swapaxes(a.reshape(B, K, T), 1, 2)
  return CapacityRoute(to_btk(kept_BxA), to_btk(pos_BxA), cum_BxAxE[:, -1])


def _capacity(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights, batched_fn, *,
              num_experts, capacity_factor, axis_name, num_shards, tensor_axis=None):
  B, T, D = x_BxTxD.shape
  K = expert_BxTxK.shape[-1]
  E = num_experts
  C = expert_capacity(T, E, K, capacity_factor)
  Ps, El = num_shards, num_experts // num_shards
  N, R = B * T, B * E * C
  route = capacity_route(expert_BxTxK, valid_BxT, E, C)

  # Buffer rows are laid out as the experts read them: [E, B, C] on one
  # device, [P_owner, B, E_l, C] (the all_to_all's send layout) under expert
  # parallelism. `row` numbers slot (b, e, c); `to_rows` lays out a [B, E, C]
  # array in that order.
  def row(b, e, c):
    if axis_name is None:
      return (e * B + b) * C + c
    return ((e // El * B + b) * El + e % El) * C + c

  def to_rows(a_BxExC):
    if axis_name is None:
      return jnp.swapaxes(a_BxExC, 0, 1).reshape(R)
    return a_BxExC.reshape(B, Ps, El, C).transpose(1, 0, 2, 3).reshape(R)

  b_BxTxK = jnp.arange(B, dtype=jnp.int32)[:, None, None]
  e_BxTxK = expert_BxTxK.astype(jnp.int32)
  # assignment -> buffer row (clipped in range where dropped: masked by kept)
  slot_NxK = row(b_BxTxK, e_BxTxK, jnp.clip(route.pos_BxTxK, 0, C - 1)).reshape(N, K)
  kept_NxK = route.kept_BxTxK.reshape(N, K)
  # buffer row -> assignment: a scatter of int ids (each kept assignment owns
  # its slot); empty slots point at assignment 0, masked by filled.
  asg_R = jnp.zeros((R,), jnp.int32).at[jnp.where(kept_NxK, slot_NxK, R)].set(
      jnp.arange(N * K, dtype=jnp.int32).reshape(N, K), mode='drop')
  filled_R = to_rows(jnp.arange(C, dtype=jnp.int32) < route.count_BxE[:, :, None])

  # dispatch: token rows -> slots (its transpose: slots -> the token's K rows)
  buf_RxD = take_rows(x_BxTxD.reshape(N, D), (asg_R // K)[:, None], filled_R[:, None],
                      slot_NxK, kept_NxK)
  if axis_name is None:
    y_RxD = batched_fn(weights, buf_RxD.reshape(E, B * C, D)).reshape(R, D)
  else:
    # [P_owner, B, E_l, C, D] -> exchange -> [P_source, B, E_l, C, D]
    recv = jax.lax.all_to_all(buf_RxD.reshape(Ps, B, El, C, D), axis_name, 0, 0, tiled=True)
    h_ElxMxD = recv.transpose(2, 0, 1, 3, 4).reshape(El, Ps * B * C, D)
    y_ElxMxD = batched_fn(weights, h_ElxMxD)
    back = y_ElxMxD.reshape(El, Ps, B, C, D).transpose(1, 2, 0, 3, 4)
    y_RxD = jax.lax.all_to_all(back, axis_name, 0, 0, tiled=True).reshape(R, D)

  gate_NxK = gate_BxTxK.reshape(N, K).astype(y_RxD.dtype)
  if tensor_axis is not None:
    # The expert outputs are partial sums over `tensor`, the gates are not:
    # autodiff would make the gates varying where the two meet (and psum
    # their cotangent); a custom VJP has to be given matching inputs.
    gate_NxK = jax.lax.pcast(gate_NxK, tensor_axis, to='varying')
  y_NxD = combine_rows(y_RxD, gate_NxK, slot_NxK, kept_NxK, asg_R, filled_R)
  return y_NxD.reshape(B, T, D), route.kept_BxTxK


# --------------------------------------------------------------- dropless path


def _sorted_assignments(expert_BxTxK, valid_BxT, num_experts):
  """Token-major flat assignments (a = n * K + k), sorted by expert; within an
  expert all first choices in token order, then all second choices, ... (the
  order in which a bounded receive buffer keeps them)."""
  B, T, K = expert_BxTxK.shape
  e_A = jnp.where(valid_BxT[..., None], expert_BxTxK, num_experts).reshape(B * T * K)
  k_A = jnp.tile(jnp.arange(K, dtype=e_A.dtype), B * T)
  order_A = jnp.argsort(e_A * K + k_A, stable=True)
  return e_A, order_A


def _unsort_and_combine(y_src_MxD, pos_A, kept_A, gate_BxTxK):
  """Assignment a's output is row pos_A[a] of y_src where kept_A[a], else 0."""
  B, T, K = gate_BxTxK.shape
  D = y_src_MxD.shape[-1]
  y_AxD = jnp.take(y_src_MxD, pos_A, axis=0, mode='clip')
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
  return _unsort_and_combine(y_sorted_AxD, jnp.argsort(order_A), e_A < num_experts,
                             gate_BxTxK)


def water_fill(demand_S: jax.Array, rows: int) -> jax.Array:
  """Max-min fair grants of `rows` among segments that ask for demand_S rows.

  Each segment gets min(demand, L) for the highest level L at which the
  grants fit; the rows left over (fewer than the segments above L) go one
  each to the first segments above L. The same as handing out one row per
  segment per turn, in segment order, until the rows or the demand run out.
  """
  S = demand_S.shape[0]
  v_S = jnp.sort(demand_S)
  j_S = jnp.arange(S, dtype=demand_S.dtype)
  # If L lies between the j-1-th and the j-th smallest demand, the j smallest
  # get theirs and the other S - j get L each.
  level_S = (rows - _exclusive_cumsum(v_S)) // (S - j_S)
  inside_S = level_S < v_S
  level = jnp.where(inside_S.any(), level_S[jnp.argmax(inside_S)], v_S[-1])
  grant_S = jnp.minimum(demand_S, level)
  above_S = demand_S > level
  extra_S = above_S & (_exclusive_cumsum(above_S.astype(demand_S.dtype)) < rows - grant_S.sum())
  return grant_S + extra_S.astype(demand_S.dtype)


def _segment_rows(sizes_S, rows: int):
  """For rows 0..rows-1 of a concatenation of segments of sizes_S:
  (segment, place in it, inside any segment)."""
  end_S = jnp.cumsum(sizes_S)
  row_M = jnp.arange(rows, dtype=jnp.int32)
  seg_M = jnp.minimum(jnp.searchsorted(end_S, row_M, side='right'), sizes_S.shape[0] - 1)
  return seg_M, row_M - (end_S - sizes_S)[seg_M], row_M < end_S[-1]


def _dropless_expert_parallel(x_BxTxD, expert_BxTxK, gate_BxTxK, valid_BxT, weights,
                              grouped_fn, *, num_experts, axis_name, num_shards, emulate,
                              buffer_factor=0.0):
  B, T, D = x_BxTxD.shape
  K = expert_BxTxK.shape[-1]
  N, Ps = B * T, num_shards
  E, El = num_experts, num_experts // num_shards
  A = N * K
  R = dropless_receive_rows(N, E, K, Ps, buffer_factor)
  bounded = R < Ps * N * min(K, El)  # static: 0 keeps the worst-case graph
  e_A, order_A = _sorted_assignments(expert_BxTxK, valid_BxT, E)
  a2a = lambda v: jax.lax.all_to_all(v, axis_name, 0, 0, tiled=True)

  # Sizes: sorted by global expert e = p * E_l + l, the rows for shard p are
  # contiguous, in (p, l) segments.
  counts_PxEl = _count(e_A, E, axis=0).reshape(Ps, El)
  recv_counts_PxEl = a2a(counts_PxEl)         # row s: what source s routes to me
  if bounded:
    # What fits: this shard grants each (source, local expert) segment its
    # share of the R rows (`water_fill`), and one exchange tells each source
    # its grants and where its kept rows land.
    recv_kept_PxEl = water_fill(recv_counts_PxEl.reshape(-1), R).reshape(Ps, El)
    recv_P = recv_kept_PxEl.sum(1)
    recv_off_P = _exclusive_cumsum(recv_P)    # where source s lands here
    granted = a2a(jnp.concatenate([recv_kept_PxEl, recv_off_P[:, None]], axis=1))
    kept_PxEl, dest_off_P = granted[:, :El], granted[:, El]
  else:
    recv_kept_PxEl, kept_PxEl = recv_counts_PxEl, counts_PxEl
    recv_P = recv_kept_PxEl.sum(1)
    recv_off_P = _exclusive_cumsum(recv_P)
    dest_off_P = a2a(recv_off_P)              # where my rows land on shard p
  send_P = kept_PxEl.sum(1)
  send_off_P = _exclusive_cumsum(send_P)
  back_off_P = a2a(send_off_P)                # where results land on source s

  count_start_E = _exclusive_cumsum(counts_PxEl.reshape(-1))
  kept_E = kept_PxEl.reshape(-1)
  kept_start_E = _exclusive_cumsum(kept_E)
  if bounded:
    # Send layout: each (p, l) segment keeps its first kept rows of the
    # sorted order; the unsent rest (past sum(kept)) is never read.
    seg_A, at_A, inside_A = _segment_rows(kept_E, A)
    sorted_A = jnp.where(inside_A, count_start_E[seg_A] + at_A, jnp.arange(A))
    send_AxD = jnp.take(x_BxTxD.reshape(N, D), order_A[sorted_A] // K, axis=0)
  else:
    send_AxD = jnp.take(x_BxTxD.reshape(N, D), order_A // K, axis=0)
  recv_RxD = ragged_all_to_all(send_AxD, jnp.zeros((R, D), send_AxD.dtype), send_off_P,
                               send_P, dest_off_P, recv_P, axis_name=axis_name,
                               num_shards=Ps, emulate=emulate)

  # Arrival order is (source, local expert); the grouped matmul wants
  # (local expert, source). Both layouts are concatenations of the same
  # segments, so each row's place in the other follows from the segment sizes.
  c_flat = recv_kept_PxEl.reshape(-1)
  g_flat = recv_kept_PxEl.T.reshape(-1)
  start_arrival_PxEl = _exclusive_cumsum(c_flat).reshape(Ps, El)
  start_grouped_PxEl = _exclusive_cumsum(g_flat).reshape(El, Ps).T
  row_R = jnp.arange(R, dtype=jnp.int32)
  # grouped row q <- arrival row
  seg_q, at_q, inside_q = _segment_rows(g_flat, R)
  el_q, src_q = seg_q // Ps, seg_q % Ps
  from_q = jnp.where(inside_q, start_arrival_PxEl[src_q, el_q] + at_q, row_R)
  x_grouped_RxD = jnp.take(recv_RxD, from_q, axis=0)
  y_grouped_RxD = grouped_fn(weights, x_grouped_RxD, recv_kept_PxEl.sum(0))
  # arrival row r <- grouped row
  seg_r, at_r, inside_r = _segment_rows(c_flat, R)
  src_r, el_r = seg_r // El, seg_r % El
  from_r = jnp.where(inside_r, start_grouped_PxEl[src_r, el_r] + at_r, row_R)
  y_arrival_RxD = jnp.take(y_grouped_RxD, from_r, axis=0)

  y_back_AxD = ragged_all_to_all(y_arrival_RxD, jnp.zeros((A, D), y_arrival_RxD.dtype),
                                 recv_off_P, recv_P, back_off_P, send_P,
                                 axis_name=axis_name, num_shards=Ps, emulate=emulate)
  sorted_pos_A = jnp.argsort(order_A)
  if not bounded:
    return _unsort_and_combine(y_back_AxD, sorted_pos_A, e_A < E, gate_BxTxK)
  # Assignment a is the rank_A-th row of its (p, l) segment: kept iff within
  # the segment's grant, and then back at that place of the kept layout.
  e_c = jnp.minimum(e_A, E - 1)
  rank_A = sorted_pos_A - count_start_E[e_c]
  kept_A = (e_A < E) & (rank_A < kept_E[e_c])
  return _unsort_and_combine(y_back_AxD, kept_start_E[e_c] + rank_A, kept_A, gate_BxTxK)


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
