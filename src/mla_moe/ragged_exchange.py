"""`jax.lax.ragged_all_to_all`, and a jnp emulation of it for platforms that lack the op.

XLA:CPU has no ragged-all-to-all ("HLO opcode ragged-all-to-all is not supported"), so without
a stand-in the MoE's ragged exchange (`moe_parallel._ragged`: its packing, receive layout and
drop rule) could only be compiled for TPU/GPU, never run. `ragged_all_to_all_emulated` gives
the op's exact results with collectives every platform has, inside the same `shard_map` over
the same mesh axis: an `all_to_all` of the offset vectors (as jax's own transpose rule does)
tells each receiver where the slices sent to it start in their senders' operands and in its
output; an `all_gather` of the operands then lets it gather each received row itself. It is
built from differentiable ops, so its gradients are the op's: the cotangent of a received row
goes back to the sender's operand row (the gather's transpose, a reduce-scatter of the gathered
operands), the cotangent of `output` is zero on the rows written and passes elsewhere.

It moves P times the operand to every device (P the axis size), where the op moves only the
slices: it is for tests and CPU runs, not a fast path. `ragged_all_to_all` picks the op or the
emulation by the platform the program is compiled for (`supports_ragged_all_to_all`).

Semantics (jax's docstring and its letters, not the model legend's: K slices over an axis of
size P, K % P == 0, K/P per peer):
slice i of the caller's `operand`, rows `input_offsets[i] : + send_sizes[i]`, goes to peer
i // (K/P) and is written there at rows `output_offsets[i] : + send_sizes[i]` of that peer's
result, which is its `output` elsewhere: `output_offsets` are offsets in the RECEIVER's buffer.
The receiver's `recv_sizes[j]` is the size of the slice j it gets (from peer j // (K/P)); the
two size vectors must agree, `send_sizes == all_to_all(recv_sizes)`. Where written slices
overlap the later (in the receiver's slice order) wins, as in the docstring's receive loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import target_platform

# XLA implements ragged-all-to-all on these (a device's `platform` may name the GPU runtime);
# XLA:CPU does not.
NATIVE_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def supports_ragged_all_to_all(platform: str | None = None) -> bool:
    """True when XLA on `platform` (default: the target of the mesh in effect) has the op."""
    return (platform or target_platform()) in NATIVE_PLATFORMS


def ragged_all_to_all(
    operand,
    output,
    input_offsets,
    send_sizes,
    output_offsets,
    recv_sizes,
    *,
    axis_name,
    platform: str | None = None,
):
    """`jax.lax.ragged_all_to_all` where the platform has it, else the emulation (same args)."""
    fn = (
        jax.lax.ragged_all_to_all
        if supports_ragged_all_to_all(platform)
        else ragged_all_to_all_emulated
    )
    return fn(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis_name
    )


def ragged_all_to_all_emulated(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """The result of `jax.lax.ragged_all_to_all` with the same arguments, inside a shard_map
    (or any mapped context) over `axis_name`.

    operand: [N, ...] rows to send; output: [O, ...] the result's rows where nothing is
    received; input_offsets, send_sizes, output_offsets, recv_sizes: [K] integers, K a multiple
    of the axis size P. Returns [O, ...] in output's dtype. Slices that run past the operand or
    the output are undefined for the op; here rows past the output are not written and reads
    past the operand are clamped to its last row.
    """
    peers = jax.lax.axis_size(axis_name)
    k = input_offsets.shape[0]
    for name, a in (
        ("input_offsets", input_offsets),
        ("send_sizes", send_sizes),
        ("output_offsets", output_offsets),
        ("recv_sizes", recv_sizes),
    ):
        if a.ndim != 1 or a.shape[0] != k or k % peers:
            raise ValueError(
                f"{name} must have shape [K] with K a multiple of the axis size "
                f"{peers} (K={k} from input_offsets), got {a.shape}"
            )
    del send_sizes  # the senders' copy of recv_sizes: what a receiver writes is recv_sizes
    # Per slice received here (slice j comes from peer j // (K/P)): where it starts in that
    # peer's operand and in this output (the sender's input_offsets and output_offsets for it).
    src_start = jax.lax.all_to_all(input_offsets.astype(jnp.int32), axis_name, 0, 0, tiled=True)
    dst_start = jax.lax.all_to_all(output_offsets.astype(jnp.int32), axis_name, 0, 0, tiled=True)
    size = recv_sizes.astype(jnp.int32)
    operands = jax.lax.all_gather(operand, axis_name, axis=0, tiled=False)  # [P, N, ...]
    # Per output row: the slices that write it ([O, K]), the last of them, its source row.
    rows = jnp.arange(output.shape[0], dtype=jnp.int32)
    inside = (rows[:, None] >= dst_start) & (rows[:, None] < dst_start + size)
    written = inside.any(axis=1)
    last = k - 1 - jnp.argmax(inside[:, ::-1], axis=1)
    src_row = src_start[last] + rows - dst_start[last]
    got = operands.at[last // (k // peers), src_row].get(mode="clip")
    written = written.reshape(-1, *([1] * (output.ndim - 1)))
    return jnp.where(written, got.astype(output.dtype), output)
