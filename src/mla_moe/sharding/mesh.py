"""The `(data, fsdp, expert, context, tensor)` device mesh: its sizes, its checks against a
model, and the context that activates it with the rules."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.experimental import mesh_utils

from mla_moe import multislice
from mla_moe.sharding.axes import (
    MESH_AXES,
    Rules,
    current_rules,
    describe_axes,
    make_rules,
    rule_axes,
    use_rules,
)

if TYPE_CHECKING:
    from mla_moe.config import ModelConfig


_DEVICES: contextvars.ContextVar[jax.sharding.Mesh | None] = contextvars.ContextVar(
    "mla_moe_mesh_devices", default=None)


@contextlib.contextmanager
def use_mesh(
    mesh: jax.sharding.Mesh, rules: Rules | Mapping[str, Any] | None = None
) -> Iterator[jax.sharding.Mesh]:
    """`jax.set_mesh(mesh)` plus the rules: model code traced inside sees both."""
    token = _DEVICES.set(mesh)
    try:
        with jax.set_mesh(mesh), use_rules(rules):
            yield mesh
    finally:
        _DEVICES.reset(token)


def device_mesh() -> jax.sharding.Mesh | None:
    """The mesh of `use_mesh` with its devices (inside `jit`, jax exposes only the abstract
    one), for choices that depend on where the devices sit (sharding/staged.py)."""
    return _DEVICES.get()


def config_value(cfg: Any, name: str, default: Any = None) -> Any:
    """`cfg.name` of a mapping, ml_collections ConfigDict or object; `default` if absent."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Resolves `mesh.{data,fsdp,expert,context,tensor}` (-1: the remaining devices; missing:
    1)."""
    sizes = {}
    for a in MESH_AXES:
        v = config_value(mesh_cfg, a, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v == 0 or v < -1:
            raise ValueError(f"mesh.{a} must be a positive integer or -1, got {v!r}")
        sizes[a] = v
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        names = ", ".join("mesh." + a for a in free)
        raise ValueError(f"only one mesh axis may be -1, got {names}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.{free[0]}=-1: {num_devices} devices are not divisible by the other axes' "
                f"product {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        desc = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ValueError(f"mesh {desc} needs {fixed} devices, but there are {num_devices}")
    return sizes


def mesh_rules(mesh_cfg: Any) -> Rules:
    """The rules a run on this mesh config uses: its `rules` overrides of the defaults (a
    mapping or ConfigDict, as `use_mesh` takes them), else the rules in effect here."""
    overrides = config_value(mesh_cfg, "rules")
    if overrides is None:
        return current_rules()
    if isinstance(overrides, Rules):
        return overrides
    return make_rules(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)


def _sharded_dims(c: ModelConfig) -> list[tuple[str, str, int]]:
    """(logical name, config field, size) of the model dimensions the rules may split."""
    dims = [("heads", "num_attention_heads", c.num_attention_heads)]
    if c.n_routed_experts:
        dims += [
            ("exp", "n_routed_experts", c.n_routed_experts),
            ("moe_mlp", "moe_intermediate_size", c.moe_intermediate_size),
        ]
        if c.n_shared_experts:
            dims.append(
                (
                    "mlp",
                    "n_shared_experts * moe_intermediate_size",
                    c.n_shared_experts * c.moe_intermediate_size,
                )
            )
    if c.first_k_dense_replace or not c.n_routed_experts:
        dims.append(("mlp", "intermediate_size", c.intermediate_size))
    return dims + [("vocab", "vocab_size", c.vocab_size), ("embed", "hidden_size", c.hidden_size)]


def validate_mesh(
    sizes: Mapping[str, int], config: ModelConfig, rules: Rules | None = None
) -> None:
    """Checks that the model's sharded dimensions divide by the mesh axes `rules` (default:
    the rules in effect) give them, and the expert placement (no compile)."""
    c = config
    for name, field, dim in _sharded_dims(c):
        axes = rule_axes(name, sizes, rules)
        if dim % math.prod(sizes[a] for a in axes):
            raise ValueError(f"{describe_axes(axes, sizes)} does not divide {field}={dim}")
    ep = sizes.get("expert", 1)
    if c.n_routed_experts and ep > 1:
        if c.expert_devices is not None and c.expert_devices != ep:
            raise ValueError(
                f"expert_devices={c.expert_devices} disagrees with mesh.expert={ep}: the "
                "device-level balance losses use the real expert placement (leave it None)"
            )
        if c.device_limited_routing:
            per_shard = c.n_routed_experts // ep
            m = min(c.num_device_limit, ep)
            if m * per_shard < c.num_experts_per_tok:
                raise ValueError(
                    f"device_limit={m} shards of {per_shard} experts (mesh.expert={ep}) cannot "
                    f"hold num_experts_per_tok={c.num_experts_per_tok}"
                )


def _split_context(sizes: dict[str, int], devices: Sequence[jax.Device], axis_types):
    """Devices for the mesh `sizes` as jax orders them for fsdp x context as one axis, that
    axis then split (context minor: each sequence's chips consecutive); None where `expert` >
    1 sits between the two. Gathers over both axes then have the replica groups of one fsdp
    axis, which XLA:TPU keeps as all-gathers."""
    if sizes["expert"] != 1:
        return None
    merged = (sizes["data"], sizes["fsdp"] * sizes["context"], 1, 1, sizes["tensor"])
    grid = jax.make_mesh(merged, MESH_AXES, axis_types=axis_types, devices=devices).devices
    grid = grid.reshape(sizes["data"], sizes["fsdp"], sizes["context"], 1, sizes["tensor"])
    return grid.swapaxes(2, 3)


def make_mesh(
    mesh_cfg: Any, devices: Sequence[jax.Device] | None = None, *, config: ModelConfig | None = None
) -> jax.sharding.Mesh:
    """A `(data, fsdp, expert, context, tensor)` mesh over `devices` (default: all, every
    process).

    mesh_cfg: a mapping or object with integer `data`, `fsdp`, `expert`, `context` (default
    1: the sequence split over that many chips, context_parallel.py), `tensor` (-1 = the
    rest) and optionally `dcn_data`, `dcn_fsdp` (default 1): how many ways those two axes
    extend across slices (`multislice.py`; the other sizes are then per slice), and `rules`
    (overrides of the default rules). With `config` (a ModelConfig) the sharded dimensions are
    checked too, against `mesh_rules(mesh_cfg)`. Axes are `Auto`: jitted functions state their
    in/out shardings, the compiler propagates the rest.
    """
    devices = jax.devices() if devices is None else list(devices)
    dcn = multislice.dcn_shape(mesh_cfg)
    granules = multislice.check_granules(dcn, devices)
    sizes = mesh_shape(mesh_cfg, len(devices) // math.prod(dcn.values()))
    sizes = {a: n * dcn.get(a, 1) for a, n in sizes.items()}
    if config is not None:
        validate_mesh(sizes, config, mesh_rules(mesh_cfg))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if granules is None:  # one slice: jax's topology-aware mesh, as ever
        shape = tuple(sizes[a] for a in MESH_AXES)
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
        except NotImplementedError:
            # jax's assignment lets no axis span part of a torus dimension (fsdp=128 x
            # context=4 on v5p:8x8x8 splits one 2 x 4).
            grid = _split_context(sizes, devices, axis_types)
            if grid is None:
                grid = mesh_utils.create_device_mesh(shape, devices[:math.prod(shape)],
                                                     allow_split_physical_axes=True)
            return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.sharding.Mesh(
        multislice.hybrid_devices(sizes, dcn, devices, granules), MESH_AXES, axis_types=axis_types
    )
