"""Expert-parallel routed experts: `jax.shard_map` over the mesh's `expert` axis.

Legend: see layers.py; in a shard, T is the shard's tokens, E its local experts (E/P), P the
size of the `expert` axis, X the per-destination buffer rows, M = T*K assignments, and x the rows
of the ragged exchange's receive buffer (shared by every source: at most P * X when capped).

Placement: expert e lives on expert shard e // (E/P) (contiguous blocks, the "exp" -> expert
rule; `router.expert_shards`). Routing (router.py: scores, top-k, device-limited selection;
the balance losses and token counts in moe.py) is computed once, outside the shard_map, on
the logically global arrays, so it is identical to one device and its token counts are global
(summed over every data shard) for the aux-loss-free bias update. Inside the shard_map the
tokens are split over the `batch` rule's axes plus `context` and `expert`; expert weights are
split over `expert` (and their hidden F over the `moe_mlp` axes, e.g. `tensor`, whose partial
down-projections are summed with `psum`); FSDP-sharded weight dims are gathered at the
boundary.

Token exchange (how each token reaches its experts' shards; the config field is
`moe_dispatch`, the MoE's "dispatch", not the kernel backend choice of pallas_kernels):
- all_to_all: each source shard packs its assignments per destination shard into a buffer of
  X rows, `all_to_all`, local grouped SwiGLU (`grouped_swiglu`), reverse `all_to_all`, combine.
  Capacity semantics: X = min(ceil(dispatch_capacity_factor * T*K / P), T * min(K, E/P));
  with `dispatch_capacity_factor=None`, X = T * min(K, E/P), the most one source can send to
  one destination, so nothing is ever dropped. Otherwise, per (source shard, destination
  shard) pair, assignments are ranked by router score s (highest first, ties by token then
  slot k order) and those ranked >= X are dropped: they contribute nothing (the token keeps
  its other experts, the shared experts and the residual).
- ragged_all_to_all: variable sizes via `lax.ragged_all_to_all` (TPU/GPU). With
  `dispatch_capacity_factor=None` it is dropless and the receive buffer is sized for the worst
  case, x = P * T * min(K, E/P) rows (at V3 on 512 chips, 8192 tokens per chip: 512K rows,
  7 GiB in bf16 and 14 GiB for the f32 expert outputs, per layer). Otherwise x =
  min(worst case, ceil(dispatch_capacity_factor * T*K)), the same total as the all_to_all's P
  buffers of X rows but shared by the sources: source s's chunk lands after those of sources
  < s, and the rows past x are dropped (each source sends its best-scoring assignments
  first). XLA:CPU lacks the op: there `ragged_exchange.py` emulates it exactly (an
  all_gather, P x the volume), so the same layout and drops run in the CPU tests.
- allgather: tokens all-gathered over `expert`, each shard runs its own experts on all of
  them, `psum_scatter` back. No drops; good for small P.
- auto: on TPU/GPU, allgather for P <= max(2, K) (it receives P x the shard's tokens where
  the all-to-all receives K x), else ragged_all_to_all. On CPU always allgather: there the
  collectives are copies in one host's memory and the packed all-to-all costs 2-3x the
  allgather's time at P = 4 and 8 (bench/moe_dispatch.py).
If the token count does not divide over the expert axis (e.g. one decode token), the tokens
stay replicated over `expert` and the allgather computation runs without the gather.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from mla_moe import ragged_exchange, sharding
from mla_moe.config import ModelConfig
from mla_moe.grouped_matmul import capacity_slots, default_implementation, grouped_swiglu
from mla_moe.megablox_chunked import chunked_megablox_swiglu
from mla_moe.sharding import staged
from pallas_kernels.dispatch import target_platform

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


# --- the shard_map ----------------------------------------------------------------------------
def use_parallel(config: ModelConfig) -> bool:
    """True when a multi-device mesh is active and the layer is dropless (the `capacity` impl
    keeps its global per-expert ranking and runs under the compiler's partitioning)."""
    if sharding.active_mesh() is None:
        return False
    if config.moe_impl != "dropless":
        _log_once("moe_impl='capacity' under a mesh: running the single-device algorithm "
                  "with automatic partitioning (use dispatch_capacity_factor for expert "
                  "parallelism with drops)")
        return False
    return True


def resolve_exchange(config: ModelConfig, ep: int, backend: str | None = None) -> str:
    """The exchange actually used: resolves `auto` (ragged_all_to_all is emulated on CPU)."""
    backend = backend or target_platform()
    kind = config.moe_dispatch
    if kind == "auto":
        # Per shard, the gather receives ~P x its tokens, the all-to-all ~K x: gather while
        # P <= K (it also skips the packing), all-to-all beyond. On CPU the volume is a
        # memory copy and the packing dominates: gather always.
        if backend not in ("tpu", "gpu") or ep <= max(2, config.num_experts_per_tok):
            return "allgather"
        kind = "ragged_all_to_all"
    if kind == "ragged_all_to_all" and not ragged_exchange.supports_ragged_all_to_all(backend):
        # Emulated (ragged_exchange.py): the same packing, receive layout and drops as on
        # TPU/GPU, with P x the exchanged volume.
        _log_once(f"moe_dispatch='ragged_all_to_all': XLA:{backend} has no ragged-all-to-all; "
                  "running its all_gather emulation")
    return kind


def is_dropless(config: ModelConfig, ep: int, backend: str | None = None) -> bool:
    """True when no routed assignment can be dropped by construction, whatever the routing:
    no routed experts, or the dropless layer with an exchange whose buffers hold the worst
    case (the allgather, or an all-to-all without `dispatch_capacity_factor`). With
    mesh.expert = 1 the experts' weights come to the tokens (gathered over the FSDP axes at
    the layer) and nothing is exchanged."""
    if not config.n_routed_experts:
        return True
    if config.moe_impl != "dropless":
        return False
    kind = resolve_exchange(config, ep, backend)
    cf, k = config.dispatch_capacity_factor, config.num_experts_per_tok
    most = min(k, config.n_routed_experts // ep)  # per token, to one destination shard
    if kind == "all_to_all":  # X rows per destination against a source's most, T * most
        return cf is None or cf * k / ep >= most
    if kind == "ragged_all_to_all" and ep > 1:  # x receive rows against P * T * most
        return cf is None or cf * k >= ep * most
    return True  # allgather, the dropless packed fallback, or a single expert shard


def exchange_capacity(tokens: int, config: ModelConfig, ep: int) -> int:
    """X: rows per (source, destination) buffer for `tokens` tokens in a source shard."""
    k, e = config.num_experts_per_tok, config.n_routed_experts
    most = tokens * min(k, e // ep)
    if config.dispatch_capacity_factor is None:
        return most
    return max(1, min(most, math.ceil(config.dispatch_capacity_factor * tokens * k / ep)))


def ragged_receive_rows(tokens: int, config: ModelConfig, ep: int) -> int:
    """x: receive buffer rows of the ragged exchange for `tokens` tokens per source shard."""
    k, e = config.num_experts_per_tok, config.n_routed_experts
    most = ep * tokens * min(k, e // ep)
    if config.dispatch_capacity_factor is None:
        return most
    return max(1, min(most, math.ceil(config.dispatch_capacity_factor * tokens * k)))


def _local_experts(x_MD, e_M, gate_EDF, up_EDF, down_EFD):
    """SwiGLU of each row by its local expert e_M (== E marks an empty row -> zeros): [M, D] f32.

    With F split over the tensor axes these are partial down-projections; `routed_experts`
    sums them after the combine, where it is cheapest."""
    return grouped_swiglu(x_MD, e_M[:, None], None, gate_EDF, up_EDF, down_EFD)


def _combine(y_MD, weights_TK):
    t, k = weights_TK.shape
    return jnp.einsum("TKD,TK->TD", y_MD.reshape(t, k, -1), weights_TK.astype(jnp.float32))


def _local_and_destination(experts_TK, e_local):
    """Per flat assignment m = t*K + k: (its expert's index on its shard, that shard)."""
    flat_M = experts_TK.reshape(-1)
    return flat_M % e_local, flat_M // e_local


def _packed(x_TD, experts_TK, weights_TK, affinity_TK, w, ep, capacity):
    """all_to_all exchange with X = `capacity` rows per destination (the best-scoring first,
    `capacity_slots`). Returns (y_TD, dropped count)."""
    t, k = experts_TK.shape
    e_local = w[0].shape[0]
    d = x_TD.shape[-1]
    m = t * k
    local_M, dest_M = _local_and_destination(experts_TK, e_local)
    slot_M = capacity_slots(dest_M, affinity_TK.reshape(-1), ep, capacity)  # last row: trash
    send_PXD = jnp.zeros((ep * capacity + 1, d), x_TD.dtype).at[slot_M].set(
        x_TD[jnp.arange(m) // k])[:-1].reshape(ep, capacity, d)
    send_PX = jnp.full((ep * capacity + 1,), e_local, jnp.int32).at[slot_M].set(
        local_M)[:-1].reshape(ep, capacity)
    if ep > 1:
        recv_PXD = jax.lax.all_to_all(send_PXD, "expert", 0, 0)
        recv_PX = jax.lax.all_to_all(send_PX, "expert", 0, 0)
    else:
        recv_PXD, recv_PX = send_PXD, send_PX
    y_PXD = _local_experts(recv_PXD.reshape(ep * capacity, d), recv_PX.reshape(-1),
                           *w).reshape(ep, capacity, d)
    if ep > 1:
        y_PXD = jax.lax.all_to_all(y_PXD, "expert", 0, 0)
    y_slots = jnp.concatenate([y_PXD.reshape(ep * capacity, d), jnp.zeros((1, d), y_PXD.dtype)])
    y_TD = _combine(y_slots[slot_M], weights_TK)
    dropped = (slot_M == ep * capacity).sum().astype(jnp.float32)
    return y_TD, dropped


def _gather_weights(w, d_axes):
    """(gate_EDF, up_EDF, down_EFD) whole along D: all-gathered over the FSDP axes `d_axes`
    that shard it. Inside the shard_map, so that the backward reduce-scatters each weight's
    gradient (the transpose of the gather) instead of all-reducing it whole, as the implicit
    gather at the shard_map boundary would. In two stages where one would become an
    all-reduce (sharding/staged.py)."""
    if not d_axes:
        return w
    gate, up, down = w
    return (staged.all_gather(gate, d_axes, 1), staged.all_gather(up, d_axes, 1),
            staged.all_gather(down, d_axes, 2))


def _allgather(x_TD, experts_TK, weights_TK, w, ep, gather, d_axes=(), chunk=0):
    """Each expert shard computes its experts for all tokens of its expert group.

    With mesh.expert = 1 nothing is exchanged: every token is computed on its own shard by
    every expert, whose weights are gathered over the FSDP axes `d_axes` (dropless by
    construction, buffers of the shard's own T*K rows). chunk > 0: the local experts are
    gathered `chunk` at a time in a scan, so one chunk's weights (and, in the backward, their
    gradient before its reduce-scatter) exist at once. With megablox (TPU) the rows are sorted
    by expert once and each chunk's products run over its own groups' rows
    (megablox_chunked.py; all the experts at once go through megablox.py's one call); with
    the blocked implementation (CPU, GPU) each chunk's layout marks the other chunks' rows as
    no expert, and its loop visits only its own blocks."""
    e_local = w[0].shape[0]
    if gather:
        x_TD = jax.lax.all_gather(x_TD, "expert", axis=0, tiled=True)
        experts_TK = jax.lax.all_gather(experts_TK, "expert", axis=0, tiled=True)
        weights_TK = jax.lax.all_gather(weights_TK, "expert", axis=0, tiled=True)
    k = experts_TK.shape[-1]
    flat_M = experts_TK.reshape(-1)
    me = jax.lax.axis_index("expert") if ep > 1 else 0
    mine_M = flat_M // e_local == me
    local_M = jnp.where(mine_M, flat_M % e_local, e_local)
    if chunk and chunk < e_local and default_implementation(x_TD, *w) == "megablox":
        # One sort of the rows for the layer; each chunk's products run over its groups' rows.
        y_TD = chunked_megablox_swiglu(
            x_TD, local_M.reshape(-1, k), weights_TK, *w, chunk=chunk, d_axes=d_axes,
            interpret=target_platform() != "tpu")
    elif chunk and chunk < e_local:
        n = e_local // chunk
        w_chunks = tuple(a.reshape(n, chunk, *a.shape[1:]) for a in w)

        @jax.checkpoint  # the backward gathers each chunk again rather than keeping them all
        def step(y_TD, inputs):
            j, w_j = inputs
            rel_M = local_M - j * chunk
            e_M = jnp.where((rel_M >= 0) & (rel_M < chunk), rel_M, chunk)
            y_j = grouped_swiglu(x_TD, e_M.reshape(-1, k), weights_TK,
                                 *_gather_weights(w_j, d_axes))
            return y_TD + y_j, None

        y0 = jnp.zeros(x_TD.shape, jnp.float32)  # the shard_map checks no varying axes
        y_TD, _ = jax.lax.scan(step, y0, (jnp.arange(n), w_chunks))
    else:
        y_TD = grouped_swiglu(x_TD, local_M.reshape(-1, k), weights_TK,
                              *_gather_weights(w, d_axes))
    if ep > 1:
        if gather:
            y_TD = jax.lax.psum_scatter(y_TD, "expert", scatter_dimension=0, tiled=True)
        else:
            y_TD = jax.lax.psum(y_TD, "expert")
    return y_TD, jnp.zeros((), jnp.float32)


def _ragged(x_TD, experts_TK, weights_TK, affinity_TK, w, ep, recv_rows):
    """Variable-size exchange with `lax.ragged_all_to_all` (emulated where XLA lacks it) into
    `recv_rows` receive rows; assignments past them are dropped. Returns (y_TD, dropped)."""
    t, k = experts_TK.shape
    e_local = w[0].shape[0]
    d = x_TD.shape[-1]
    m = t * k
    local_M, dest_M = _local_and_destination(experts_TK, e_local)
    order_M = jnp.lexsort((-affinity_TK.reshape(-1), dest_M))  # by dest, then best first
    xs_MD = x_TD[order_M // k]
    es_M1 = local_M[order_M].astype(jnp.int32)[:, None]
    want_P = jnp.zeros((ep,), jnp.int32).at[dest_M].add(1)
    in_off_P = jnp.cumsum(want_P) - want_P
    # want_PP[s, p]: rows shard s has for shard p (every shard's row of the matrix).
    want_PP = jax.lax.all_gather(want_P, "expert", axis=0, tiled=False)
    # Receiver p stacks the chunks of sources 0, 1, ...; what passes its last row is dropped.
    start_PP = jnp.cumsum(want_PP, axis=0) - want_PP
    sizes_PP = jnp.clip(recv_rows - start_PP, 0, want_PP).astype(jnp.int32)
    out_off_PP = jnp.minimum(start_PP, recv_rows).astype(jnp.int32)
    me = jax.lax.axis_index("expert")
    send_P, out_off_P = sizes_PP[me], out_off_PP[me]
    recv_P = sizes_PP[:, me]
    recv_xD = ragged_exchange.ragged_all_to_all(
        xs_MD, jnp.zeros((recv_rows, d), x_TD.dtype), in_off_P, send_P, out_off_P, recv_P,
        axis_name="expert")
    recv_x1 = ragged_exchange.ragged_all_to_all(
        es_M1, jnp.full((recv_rows, 1), e_local, jnp.int32), in_off_P, send_P, out_off_P,
        recv_P, axis_name="expert")
    # Back in the activation dtype: the receive buffer's f32 copies (outputs, their return
    # trip and its transpose) were the largest temporaries of V3's train step.
    y_xD = _local_experts(recv_xD, recv_x1[:, 0], *w).astype(x_TD.dtype)
    # Reverse: my received chunk from source s starts at out_off[s -> me] and goes back to
    # offset in_off[s -> me] of s's send buffer; the dropped rows stay zero there.
    back_in_off_P = out_off_PP[:, me]
    in_off_PP = jax.lax.all_gather(in_off_P, "expert", axis=0, tiled=False)
    back_out_off_P = in_off_PP[:, me]
    ys_MD = ragged_exchange.ragged_all_to_all(
        y_xD, jnp.zeros((m, d), y_xD.dtype), back_in_off_P, recv_P, back_out_off_P, send_P,
        axis_name="expert")
    y_MD = jnp.zeros_like(ys_MD).at[order_M].set(ys_MD)
    dropped = (m - send_P.sum()).astype(jnp.float32)
    return _combine(y_MD, weights_TK), dropped


def _token_axes(mesh, tokens: int, rules) -> tuple[tuple[str, ...], bool]:
    """(mesh axes splitting the tokens inside the layer, whether `expert` is among them): the
    batch rule's axes, `context` (each sequence's tokens, a batch axis here) and `expert`,
    dropping `expert` first, then the others from the last, until the tokens divide."""
    axes = sharding.dividing_axes("batch", tokens, mesh, rules, extra=("context", "expert"))
    return axes, "expert" in axes


def routed_experts(x_TD: jax.Array, experts_TK: jax.Array, weights_TK: jax.Array,
                   affinity_TK: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array,
                   down_EFD: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Expert-parallel routed-expert output under the active mesh: (y_TD f32, dropped count).

    x_TD: [T, D] all tokens of the call (global view); experts_TK/weights_TK/affinity_TK: the
    routing (affinity = s of the chosen experts, used to rank drops); weights [E, D, F] and
    [E, F, D] in the compute dtype.
    """
    mesh = sharding.active_mesh()
    rules = sharding.current_rules()
    sizes = dict(mesh.shape)
    ep = sizes.get("expert", 1)
    t = x_TD.shape[0]
    tok_axes, split_over_expert = _token_axes(mesh, t, rules)
    exp_axes = sharding.rule_axes("exp", mesh, rules)
    if exp_axes not in ((), ("expert",)) or (ep > 1 and exp_axes != ("expert",)):
        raise ValueError(f"expert parallelism needs the rule exp -> ('expert',), got {exp_axes}")
    # F over the moe_mlp axes that split neither the tokens nor the experts (or none); the
    # weights' D stays split over its FSDP axes into the shard_map, and the body gathers it.
    f_axes = sharding.dividing_axes("moe_mlp", gate_EDF.shape[-1], mesh, rules,
                                    exclude=(*tok_axes, "expert"), whole=True)
    d_axes = sharding.dividing_axes("embed", gate_EDF.shape[1], mesh, rules,
                                    exclude=(*f_axes, "expert"), whole=True)
    chunk = config.expert_gather_chunk
    if not set(d_axes) <= set(tok_axes):  # e.g. one decode token: too few to split
        chunk = 0
    elif chunk and (gate_EDF.shape[0] // ep) % chunk:
        _log_once(f"expert_gather_chunk={chunk} does not divide the {gate_EDF.shape[0] // ep} "
                  "experts of a shard: their weights are gathered all at once")
        chunk = 0

    kind = resolve_exchange(config, ep)
    if not split_over_expert and ep > 1:
        if kind != "allgather":
            _log_once(f"{t} tokens do not divide over mesh.expert={ep}: tokens stay replicated "
                      "over `expert` (allgather computation without the gather)")
        kind = "allgather"
    t_shard = t // math.prod(sizes[a] for a in tok_axes) if tok_axes else t

    def body(x_TD, experts_TK, weights_TK, affinity_TK, gate, up, down):
        w = (gate, up, down)
        if kind == "allgather":
            y_TD, dropped = _allgather(x_TD, experts_TK, weights_TK, w, ep, split_over_expert,
                                       d_axes, chunk)
            return _reduce(y_TD, dropped)
        w = _gather_weights(w, d_axes)
        if kind == "ragged_all_to_all" and ep > 1:
            y_TD, dropped = _ragged(x_TD, experts_TK, weights_TK, affinity_TK, w, ep,
                                    ragged_receive_rows(t_shard, config, ep))
        else:
            if kind == "all_to_all":
                capacity = exchange_capacity(t_shard, config, ep)
            else:  # ragged_all_to_all with P = 1: nothing exchanged, never drop
                capacity = t_shard * min(config.num_experts_per_tok, gate.shape[0])
            y_TD, dropped = _packed(x_TD, experts_TK, weights_TK, affinity_TK, w, ep, capacity)
        return _reduce(y_TD, dropped)

    def _reduce(y_TD, dropped):
        if f_axes:  # F split over the tensor axes: the down-projections are partial sums
            y_TD = jax.lax.psum(y_TD, f_axes)
        if tok_axes:
            dropped = jax.lax.psum(dropped, tok_axes)
        return y_TD, dropped

    # The shard_map's own rules: tokens, experts, F and D over the axes chosen above.
    layer_rules = sharding.Rules({"batch": tok_axes, "exp": exp_axes, "moe_mlp": f_axes,
                                  "embed": d_axes})
    rows, w_in, w_out = ("batch", None), ("exp", "embed", "moe_mlp"), ("exp", "moe_mlp", "embed")
    # Unchecked varying axes: megablox's `pallas_call` (the TPU grouped matmul) cannot state
    # its outputs' and is rejected by a checked shard_map; the tests hold every exchange's
    # forward and gradients to one device's.
    return sharding.per_shard(
        body, (x_TD, experts_TK, weights_TK, affinity_TK, gate_EDF, up_EDF, down_EFD),
        (rows, rows, rows, rows, w_in, w_in, w_out), (rows, ()), out_shapes=(x_TD.shape, ()),
        rules=layer_rules, strict=True)
