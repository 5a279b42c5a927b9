"""The mesh axes, the logical-name rules table, and which mesh axes split a dimension."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

# A concrete mesh, or the abstract one that `jax.set_mesh` makes visible while tracing.
MeshLike = jax.sharding.Mesh | jax.sharding.AbstractMesh

# `context` splits each sequence (T) over chips: context parallelism (context_parallel.py).
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

AxisRule = tuple[str, tuple[str, ...]]

DEFAULT_RULES: tuple[AxisRule, ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", ("context",)),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # weights
    ("layers", ()),
    ("vocab", ("tensor",)),
    # `context` holds every weight like `fsdp` does: its shards see different tokens, so
    # their gradients are reduced over it, and each holds 1/context of the weights.
    ("embed", ("fsdp", "context")),
    ("heads", ("tensor",)),
    ("kv", ()),
    ("q_lora", ("fsdp", "context")),
    ("kv_lora", ("fsdp", "context")),
    ("mlp", ("tensor",)),
    ("exp", ("expert",)),
    ("moe_mlp", ("tensor",)),
    ("norm", ()),
)


class Rules(Mapping):
    """An immutable logical-name -> mesh-axes table (a Mapping of name -> tuple of axes), from
    a mapping or (name, axes) pairs; axes: a mesh axis, a tuple of them, or None."""

    def __init__(self, pairs: Mapping[str, Any] | Iterable[tuple[str, Any]]):
        table: dict[str, tuple[str, ...]] = {}
        for name, axes in pairs.items() if isinstance(pairs, Mapping) else pairs:
            table[name] = _as_axes(axes, f"rules[{name!r}]")
        self._table = table

    def __getitem__(self, name):
        return self._table[name]

    def __iter__(self):
        return iter(self._table)

    def __len__(self):
        return len(self._table)

    def __repr__(self):
        return f"Rules({self._table!r})"

    def __hash__(self):
        return hash(tuple(self._table.items()))

    def __eq__(self, other):
        return isinstance(other, Rules) and self._table == other._table


def _as_axes(axes, what: str) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        axes = (axes,)
    axes = tuple(axes)
    for a in axes:
        if a not in MESH_AXES:
            raise ValueError(f"{what}: unknown mesh axis {a!r}; the mesh axes are {MESH_AXES}")
    return axes


def make_rules(overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> Rules:
    """The default rules with `overrides` (name -> mesh axis, tuple of axes, or None) applied."""
    table = dict(DEFAULT_RULES)
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        table.update(dict(items))
    return Rules(table.items())


_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("mla_moe_rules", default=None)


def current_rules() -> Rules:
    """The rules set by `use_rules` / `use_mesh`, else the defaults."""
    rules = _RULES.get()
    return rules if rules is not None else make_rules()


@contextlib.contextmanager
def use_rules(rules: Rules | Mapping[str, Any] | None) -> Iterator[None]:
    """Model code traced inside sees `rules` (a table or overrides of the defaults)."""
    token = _RULES.set(rules if isinstance(rules, Rules) or rules is None else make_rules(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


# --- the mesh in effect -----------------------------------------------------------------------
def active_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by `jax.set_mesh` / `use_mesh` (abstract), or None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.shape or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def mesh_axis_size(name: str, mesh: MeshLike | None = None) -> int:
    """Size of mesh axis `name` (1 without a mesh or without that axis)."""
    mesh = active_mesh() if mesh is None else mesh
    return 1 if mesh is None else dict(mesh.shape).get(name, 1)


def _sizes(mesh: MeshLike | Mapping[str, int]) -> dict[str, int]:
    return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)


def describe_axes(axes: Sequence[str], sizes: Mapping[str, int]) -> str:
    """E.g. "mesh.expert=4 x mesh.fsdp=2", for error messages."""
    return " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)


# --- which mesh axes split a dimension --------------------------------------------------------
def rule_axes(
    name: str,
    mesh: MeshLike | Mapping[str, int],
    rules: Rules | None = None,
    *,
    exclude: Iterable[str] = (),
) -> tuple[str, ...]:
    """The mesh axes the rule of logical `name` gives (none for a name without a rule), less
    those of size 1 and those in `exclude`. mesh: a mesh or its {axis: size}."""
    rules = current_rules() if rules is None else rules
    sizes, exclude = _sizes(mesh), set(exclude)
    return tuple(a for a in rules.get(name, ()) if sizes.get(a, 1) > 1 and a not in exclude)


def dividing_axes(
    name: str,
    size: int,
    mesh: MeshLike | Mapping[str, int],
    rules: Rules | None = None,
    *,
    exclude: Iterable[str] = (),
    extra: Sequence[str] = (),
    whole: bool = False,
) -> tuple[str, ...]:
    """The mesh axes that split a dimension of logical `name` and `size`: `rule_axes`, then
    the axes of `extra` not among them (same filters), cut to the longest leading run whose
    product divides `size` (possibly none); whole: all of them if it divides, else none."""
    sizes, exclude = _sizes(mesh), tuple(exclude)
    axes = rule_axes(name, sizes, rules, exclude=exclude)
    axes += tuple(a for a in extra if sizes.get(a, 1) > 1 and a not in axes + exclude)
    if whole:
        return axes if size % math.prod(sizes[a] for a in axes) == 0 else ()
    while axes and size % math.prod(sizes[a] for a in axes):
        axes = axes[:-1]
    return axes


def batch_axes(mesh: MeshLike | None = None, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch / token dimension."""
    mesh = active_mesh() if mesh is None else mesh
    return () if mesh is None else rule_axes("batch", mesh, rules)


def data_parallel_size(mesh: MeshLike, rules: Rules | None = None) -> int:
    """How many ways the batch is split: the product of the `batch` rule's mesh axes."""
    sizes = dict(mesh.shape)
    return math.prod(sizes[a] for a in batch_axes(mesh, rules))


# --- logical names -> specs -------------------------------------------------------------------
_warned: set[str] = set()


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: MeshLike,
    rules: Rules | None = None,
    *,
    what: str = "array",
    strict: bool = True,
) -> P:
    """The PartitionSpec of an array with logical axis `names` and `shape` on `mesh`.

    Each dimension takes the `dividing_axes` of its name not taken by an earlier dimension.
    strict: a dimension its mesh axes do not all divide raises (weights); otherwise that
    dimension is split over the longest leading run of its axes that divides it, possibly
    none (activations: e.g. a decode batch of 4 on fsdp=2 x expert=4 is split over fsdp only).
    """
    rules = current_rules() if rules is None else rules
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            if name not in _warned:
                _warned.add(name)
                log.warning("no sharding rule for logical axis %r: replicated", name)
            spec.append(None)
            continue
        axes = dividing_axes(name, size, sizes, rules, exclude=used)
        if strict:
            every = rule_axes(name, sizes, rules, exclude=used)
            if axes != every:
                raise ValueError(
                    f"{what}: dimension {dim} ({name!r}, size {size}) is not "
                    f"divisible by {describe_axes(every, sizes)}"
                )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


# --- activations ------------------------------------------------------------------------------
def constrain(x: jax.Array, logical_names: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the active mesh; a no-op without one
    (or on non-`Auto` mesh axes). A dimension its mesh axes do not divide is split over the
    leading axes that do (`logical_to_spec(strict=False)`)."""
    mesh = active_mesh()
    if mesh is None or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return x
    spec = logical_to_spec(logical_names, x.shape, mesh, strict=False)
    return jax.lax.with_sharding_constraint(x, spec)


# Mesh axes that hold a weight without dividing the work of its products: the weight is
# gathered over them where it is used (FSDP); `tensor` and `expert` split the products.
STORAGE_AXES = frozenset({"data", "fsdp", "context"})


def gathered(w: jax.Array, logical_names: tuple[str | None, ...]) -> jax.Array:
    """A weight with logical axis `names` as its products use it: gathered over the axes that
    only store it (`STORAGE_AXES`), still split over the others; a no-op without a mesh.

    Gathering the value once, where it is made, lets a layer's backward under remat use the
    recomputed forward's gathered copy for its transposed products too; left to the
    partitioner, each product (forward, recomputed forward, transpose) gathers its own."""
    mesh = active_mesh()
    if mesh is None:
        return w
    rules, sizes = current_rules(), dict(mesh.shape)
    used = [n if n is not None and not set(rule_axes(n, sizes, rules)) <= STORAGE_AXES
            else None for n in logical_names]
    return constrain(w, tuple(used))

