"""The ragged all-to-all emulation (ragged_exchange.py) and the MoE's ragged exchange on CPU.

Slow twins: a per-peer numpy loop of `jax.lax.ragged_all_to_all`'s documented semantics
(forward, and the gradient its transpose rule gives), and the one-device `MoE` for the layer
with `moe_dispatch="ragged_all_to_all"`, dropless and with a receive buffer small enough to
drop (the dropped assignments named independently from the routing).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from test_moe_parallel import (
    CFG,
    FAST_COMPILE,
    _assert_matches_single_device,
    _inputs,
    _model_state,
    _routing_numpy,
)
from tolerance import assert_close_scaled

from mla_moe import moe_parallel, ragged_exchange, sharding
from mla_moe.moe import dropless_experts


# --- the emulation against the op's semantics ------------------------------------------------
def _random_exchange(rng, peers, per_peer, n_rows, most):
    """Consistent arguments for every peer, stacked [peer, ...]: each receiver's slices at
    disjoint random places of its output (in a random order, with gaps), empty slices at any
    offset up to the end of the output, reads anywhere in the operand (they may overlap)."""
    k = peers * per_peer
    out_rows = k * most + 7
    send = rng.integers(0, most + 1, (peers, k))
    send[rng.random((peers, k)) < 0.2] = 0
    in_off = rng.integers(0, n_rows - send + 1)
    out_off = np.zeros((peers, k), np.int64)
    recv = np.zeros((peers, k), np.int64)
    for r in range(peers):
        pieces = [(s, j) for s in range(peers) for j in range(per_peer)]
        rng.shuffle(pieces)
        sizes = [send[s, r * per_peer + j] for s, j in pieces]
        gaps = rng.multinomial(out_rows - sum(sizes), np.ones(len(pieces) + 1) / (len(pieces) + 1))
        pos = 0
        for (s, j), size, gap in zip(pieces, sizes, gaps, strict=False):
            pos += gap
            i = r * per_peer + j
            out_off[s, i] = pos if size else rng.integers(0, out_rows + 1)
            recv[r, s * per_peer + j] = size
            pos += size
    return out_rows, in_off, send, out_off, recv


def _reference(operand, output, in_off, send, out_off, recv, per_peer, ct=None):
    """Per peer, the op's send and receive loops (jax's docstring). With a cotangent `ct` of
    the result: the loops' gradient (d operand, d output), as the op's transpose rule states
    it: received rows' cotangents back to the rows sent, zero on the output rows written."""
    peers, k = in_off.shape
    result = output.copy()
    d_operand, d_output = np.zeros_like(operand), None if ct is None else ct.copy()
    for r in range(peers):
        for i in range(k):
            s, j = divmod(i, per_peer)
            sent = r * per_peer + j  # the sender's index of this slice
            assert recv[r, i] == send[s, sent]
            src = slice(in_off[s, sent], in_off[s, sent] + send[s, sent])
            dst = slice(out_off[s, sent], out_off[s, sent] + recv[r, i])
            result[r, dst] = operand[s, src]
            if ct is not None:
                d_operand[s, src] += ct[r, dst]
                d_output[r, dst] = 0
    return result if ct is None else (d_operand, d_output)


def _mesh(peers):
    return jax.make_mesh(
        (peers,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:peers]
    )


def _emulated(peers, fn=ragged_exchange.ragged_all_to_all_emulated):
    """fn over a `peers`-device axis on arrays stacked [peer, ...] (merged at the boundary)."""

    def body(operand, output, *offsets_and_sizes):
        return fn(operand[0], output[0], *(a[0] for a in offsets_and_sizes), axis_name="x")[None]

    return jax.jit(jax.shard_map(body, mesh=_mesh(peers), in_specs=P("x"), out_specs=P("x")))


def test_docstring_example():
    """The worked example of jax's docstring, axis of size 2."""
    args = [
        np.array(a, np.int32)
        for a in (
            [[1, 2, 2], [3, 4, 0]],
            [[0, 0, 0, 0]] * 2,
            [[0, 1], [0, 1]],
            [[1, 2], [1, 1]],
            [[0, 0], [1, 2]],
            [[1, 1], [2, 1]],
        )
    ]
    got = _emulated(2)(*args)
    np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize("peers, per_peer", [(8, 1), (4, 2)])
def test_emulation_matches_the_op_forward_and_gradient(peers, per_peer):
    rng = np.random.default_rng(peers * 10 + per_peer)
    n_rows, most = 10, 3
    out_rows, in_off, send, out_off, recv = _random_exchange(rng, peers, per_peer, n_rows, most)
    operand = rng.standard_normal((peers, n_rows, 2)).astype(np.float32)
    output = rng.standard_normal((peers, out_rows, 2)).astype(np.float32)
    ct = rng.standard_normal(output.shape).astype(np.float32)
    ints = [a.astype(np.int32) for a in (in_off, send, out_off, recv)]
    fn = _emulated(peers)

    got, vjp = jax.vjp(lambda a, b: fn(a, b, *ints), operand, output)
    want = _reference(operand, output, in_off, send, out_off, recv, per_peer)
    np.testing.assert_array_equal(got, want)  # rows are copied, never computed
    assert (got != output).any() and (got == output).any()  # some rows received, some kept
    d_operand, d_output = vjp(ct)
    want_operand, want_output = _reference(
        operand, output, in_off, send, out_off, recv, per_peer, ct
    )
    assert_close_scaled(d_operand, want_operand, rel=1e-6)  # rows read twice sum two rows
    np.testing.assert_array_equal(d_output, want_output)

    # Integer operands (the exchanged expert ids) move the same way.
    ids = np.arange(operand.size, dtype=np.int32).reshape(operand.shape)
    kept = np.full(output.shape, -1, np.int32)
    np.testing.assert_array_equal(
        fn(ids, kept, *ints), _reference(ids, kept, in_off, send, out_off, recv, per_peer)
    )


def test_platform_picks_the_op_or_the_emulation():
    """Read from the mesh the program is traced for: an abstract TPU mesh gets the op itself
    (only traced here), the CPU mesh the emulation."""

    def traced(mesh, operand):
        def body(a):
            z = jnp.zeros((8,), jnp.int32)
            return ragged_exchange.ragged_all_to_all(
                a, jnp.zeros_like(a), z, z, z, z, axis_name="x"
            )

        fn = jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
        return str(jax.make_jaxpr(fn)(operand))

    tpu = jax.sharding.AbstractMesh(
        (8,),
        ("x",),
        (AxisType.Auto,),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind="TPU v5", num_cores=1, platform="tpu"
        ),
    )
    with jax.sharding.use_abstract_mesh(tpu):
        assert "ragged_all_to_all" in traced(tpu, jax.ShapeDtypeStruct((16, 2), jnp.float32))
    cpu = _mesh(8)
    with jax.set_mesh(cpu):
        assert "ragged_all_to_all" not in traced(cpu, jnp.ones((16, 2)))
    assert ragged_exchange.supports_ragged_all_to_all("gpu")
    assert not ragged_exchange.supports_ragged_all_to_all("cpu")


# --- the MoE layer's ragged exchange -----------------------------------------------------------
@pytest.mark.parametrize("mesh_name", ["expert8", "data2_expert4"])
def test_ragged_dispatch_runs_and_matches_single_device(mesh_name, monkeypatch):
    """Dropless (receive buffer for the worst case): output, losses, counts and gradients of
    one device, through the exchange's packing and receive layout over the expert shards."""
    ragged = CFG.replace(moe_dispatch="ragged_all_to_all")
    assert moe_parallel.resolve_exchange(ragged, 8, "cpu") == "ragged_all_to_all"
    calls = []
    emulated = ragged_exchange.ragged_all_to_all_emulated

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return emulated(*args, **kwargs)

    monkeypatch.setattr(ragged_exchange, "ragged_all_to_all_emulated", counted)
    _assert_matches_single_device(mesh_name, "ragged_all_to_all")
    assert len(calls) == 3  # rows, their expert ids, the outputs' way back


def _expected_ragged_keep(experts, aff, n_src, ep, e_local, recv_rows):
    """The drop rule of `_ragged`: each receiving shard stacks the chunks of its sources in
    source order, each chunk best router score first (ties by flat assignment t*K + k); the
    rows at or past `recv_rows` of that stack are dropped."""
    t_all, k = experts.shape
    t_s = t_all // n_src
    keep = np.ones_like(experts, bool)
    for p in range(ep):
        stacked = 0
        for s in range(n_src):
            ts, ks = np.nonzero(experts[s * t_s : (s + 1) * t_s] // e_local == p)
            ts = ts + s * t_s
            order = sorted(range(len(ts)), key=lambda i: (-aff[ts[i], ks[i]], ts[i] * k + ks[i]))
            for rank, i in enumerate(order):
                keep[ts[i], ks[i]] = stacked + rank < recv_rows
            stacked += len(ts)
    return keep


def test_small_receive_buffer_drops_exactly_the_rule():
    """expert=8, dispatch_capacity_factor=1: x = T*K receive rows per shard; the
    dropped assignments are those the rule names, and the output is one device's with exactly
    those assignments' contributions removed."""
    ep, factor = 8, 1.0
    cfg = CFG.replace(moe_dispatch="ragged_all_to_all", dispatch_capacity_factor=factor)
    graphdef, state = _model_state(cfg)
    x, _ = _inputs()
    experts, weights, aff = _routing_numpy(cfg, graphdef, state, x)
    t_s, k = experts.shape[0] // ep, experts.shape[1]
    recv_rows = moe_parallel.ragged_receive_rows(t_s, cfg, ep)
    assert recv_rows == math.ceil(factor * t_s * k)
    keep = _expected_ragged_keep(experts, aff, ep, ep, cfg.n_routed_experts // ep, recv_rows)
    n_dropped = int((~keep).sum())
    assert 0 < n_dropped < keep.size // 2
    assert not moe_parallel.is_dropless(cfg, ep, "cpu")

    mesh = sharding.make_mesh(dict(expert=ep), config=cfg)
    with sharding.use_mesh(mesh):
        st = jax.device_put(state, sharding.state_shardings(state, mesh))
        xs = jax.device_put(x, sharding.batch_sharding(mesh))
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=FAST_COMPILE)(st, xs)
    assert float(out.stats.dropped_fraction) * experts.size == pytest.approx(n_dropped, abs=1e-3)

    moe = nnx.merge(graphdef, state)
    x_TD = x.reshape(-1, cfg.hidden_size)
    y_TD, _ = dropless_experts(
        x_TD, jnp.asarray(experts), jnp.asarray(weights * keep), *moe.expert_weights(jnp.float32)
    )
    y_ref = y_TD.reshape(x.shape) + moe.shared(x)
    assert_close_scaled(np.asarray(out.y_BTD), np.asarray(y_ref), rel=1e-6)
