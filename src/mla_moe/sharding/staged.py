"""All-gather and reduce-scatter of FSDP-sharded weights inside `shard_map`, in two stages where
one stage would not stay an all-gather.

XLA:TPU lowers an all-gather (or reduce-scatter) whose replica group spans all three dimensions
of a 3D torus (FSDP over every chip of v5p:8x8x8 or 4x4x4) as an all-reduce of a zero-padded
buffer: 2(N-1)/N of the gathered array over each chip's links, where an all-gather moves
(N-1)/N. A group spanning one or two torus dimensions stays an all-gather (checked on the real
compiler: tests/test_staged_gather.py). So a gather over such an axis runs as two:
  1. within blocks of consecutive axis indices that each span at most two torus dimensions
     (64 chips, one 8x8 plane, on v5p:8x8x8), giving each chip its block's slice;
  2. across the blocks, between the chips at the same place in each block (8 chips).
Consecutive blocks concatenated in order are the whole axis in order, so the result equals the
one-stage gather. The reduce-scatter is the transpose: across blocks first, then within.
Bytes over links: stage 1 moves (B-1)/B of 1/(N/B) of the array, stage 2 (N/B-1)/(N/B) of it,
about (N-1)/N in all (512 chips: 0.998 against the all-reduce's 1.996 of the array).

Over several mesh axes (the weights' `("fsdp", "context")` under context parallelism) whose
devices together span three torus dimensions, the gather runs one axis at a time, the minor
axis first (gathering over `context` gives each chip its `fsdp` index's block; gathering those
over `fsdp` gives the whole array in order), each axis staged as above where it spans three
dimensions itself. Only where the devices carry torus coordinates (TPU); otherwise (GPU, CPU)
the one-stage collective.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mla_moe.sharding.mesh import device_mesh

Groups = tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]


def _spanned(coords: np.ndarray) -> int:
    """How many torus dimensions the devices with these coordinates [n, dims] span."""
    return int(sum(len(np.unique(coords[:, i])) > 1 for i in range(coords.shape[1])))


def block_size(coords: np.ndarray) -> int:
    """The largest proper divisor B of the axis's length such that every block of B consecutive
    devices spans at most two torus dimensions; 0 when the whole axis already does (one stage
    stays an all-gather) or no such B exists."""
    n = coords.shape[0]
    if coords.ndim != 2 or _spanned(coords) <= 2:
        return 0
    for b in range(n // 2, 1, -1):
        if n % b == 0 and all(_spanned(coords[i:i + b]) <= 2 for i in range(0, n, b)):
            return b
    return 0


def stage_groups(n: int, block: int) -> Groups:
    """(within-block groups, across-block groups) of axis indices for a block size."""
    within = tuple(tuple(range(i, i + block)) for i in range(0, n, block))
    across = tuple(tuple(range(r, n, block)) for r in range(block))
    return within, across


def _tpu_coords(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> np.ndarray | None:
    """Torus coordinates [n, dims] of the devices along `axes` (index 0 of the others), in
    the order of their joint axis index; None off TPU."""
    index = tuple(slice(None) if a in axes else 0 for a in mesh.axis_names)
    devices = mesh.devices[index].reshape(-1)
    coords = [getattr(d, "coords", None) for d in devices]
    if any(c is None for c in coords) or devices[0].platform != "tpu":
        return None
    return np.asarray(coords)


@functools.lru_cache(maxsize=64)
def _groups_for(mesh: jax.sharding.Mesh, axis: str) -> Groups | None:
    coords = _tpu_coords(mesh, (axis,))
    block = 0 if coords is None else block_size(coords)
    return stage_groups(len(coords), block) if block else None


def groups(axes: tuple[str, ...]) -> tuple[str, Groups] | None:
    """(the axis, its two stages' groups) when a collective over the one live axis of `axes`
    should be staged, read from the devices of the mesh of `use_mesh`; None without one."""
    steps = plan(axes)
    return steps[0] if steps is not None and len(steps) == 1 else None


# A plan: single-axis collectives in gather order, each (axis, its two stages' groups or None).
Plan = tuple[tuple[str, Groups | None], ...]


@functools.lru_cache(maxsize=64)
def _steps_for(mesh: jax.sharding.Mesh, live: tuple[str, ...]) -> Plan | None:
    """Per-axis steps (minor axis first) when the joint group of `live` spans three torus
    dimensions; None when one collective stays an all-gather or the devices have no
    coordinates."""
    coords = _tpu_coords(mesh, live)
    if coords is None or _spanned(coords) <= 2:
        return None
    return tuple((a, _groups_for(mesh, a)) for a in reversed(live))


def plan(axes: tuple[str, ...]) -> Plan | None:
    """How to gather over `axes` on the mesh of `use_mesh`: None for one collective."""
    mesh = device_mesh()
    if mesh is None:
        return None
    live = tuple(a for a in axes if dict(mesh.shape).get(a, 1) > 1)
    if len(live) == 1:
        found = _groups_for(mesh, live[0])
        return ((live[0], found),) if found else None
    return _steps_for(mesh, live) if live else None


def _plan(axes: tuple[str, ...], staged) -> Plan | None:
    """The steps to run for `staged` (True: decided from the mesh; False: none; one axis's
    (axis, groups); or a whole plan)."""
    if not axes or staged is False or staged is None:
        return None
    if staged is True:
        return plan(axes)
    return (staged,) if isinstance(staged[0], str) else staged


def all_gather(x: jax.Array, axes: tuple[str, ...], axis: int, *,
               staged: Plan | tuple[str, Groups] | None | bool = True) -> jax.Array:
    """`lax.all_gather(x, axes, axis=axis, tiled=True)`, in stages where `plan` says so.
    staged: True (decide from the mesh), False (one collective), one axis's (axis, groups) or
    a plan."""
    steps = _plan(axes, staged)
    if steps is None:
        return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x
    for name, stages in steps:
        if stages is None:
            x = jax.lax.all_gather(x, name, axis=axis, tiled=True)
            continue
        within, across = stages
        x = jax.lax.all_gather(x, name, axis=axis, tiled=True, axis_index_groups=within)
        x = jax.lax.all_gather(x, name, axis=axis, tiled=True, axis_index_groups=across)
    return x


def psum_scatter(x: jax.Array, axes: tuple[str, ...], axis: int, *,
                 staged: Plan | tuple[str, Groups] | None | bool = True) -> jax.Array:
    """`lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True)`, the transpose of
    `all_gather` above, its steps in reverse."""
    steps = _plan(axes, staged)
    if steps is None:
        return jax.lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True) if axes else x
    for name, stages in reversed(steps):
        if stages is None:
            x = jax.lax.psum_scatter(x, name, scatter_dimension=axis, tiled=True)
            continue
        within, across = stages
        x = jax.lax.psum_scatter(x, name, scatter_dimension=axis, tiled=True,
                                 axis_index_groups=across)
        x = jax.lax.psum_scatter(x, name, scatter_dimension=axis, tiled=True,
                                 axis_index_groups=within)
    return x
