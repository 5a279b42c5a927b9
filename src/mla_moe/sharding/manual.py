"""Code that runs per shard: `jax.shard_map` with specs from logical names, and the varying
mesh axes that `shard_map` tracks on the values inside it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from mla_moe.sharding.axes import Rules, active_mesh, logical_to_spec

Names = tuple[str | None, ...]

# Logical names of the operands of attention run per shard: the tokens' rows split over the
# batch axes, the heads over theirs, every other dimension (the sequences, which attention
# needs whole) whole on every shard.
PER_HEAD: Names = ("batch", None, "act_heads", None)  # [B, T, N, *]
PER_TOKEN: Names = ("batch", None, None)  # [B, T, *] or [B, S, *]: one row per token


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def per_shard(
    fn: Callable[..., Any],
    args: Sequence[jax.Array],
    in_names: Sequence[Names],
    out_names: Names | tuple[Names, ...],
    *,
    out_shapes: Any = None,
    rules: Rules | None = None,
    strict: bool = False,
    check_vma: bool = False,
) -> Any:
    """`fn(*args)` per shard of the mesh in effect (`jax.shard_map`), or directly without one.

    Each argument is split by its logical names (`logical_to_spec` under `rules`, default the
    rules in effect): e.g. `PER_HEAD` splits the batch and the heads over the axes the rules
    give them and keeps the rest whole; mesh axes that split no named dimension see the
    argument replicated. out_names: the output's names, or a tuple of them (one per output);
    out_shapes: the outputs' global shapes in the same structure (default: from
    `jax.eval_shape(fn, *args)`), which say how far a dimension divides. strict: a named
    dimension its axes do not divide is an error (default: it is split over the leading axes
    that divide it). check_vma: as `jax.shard_map`'s; off by default, since a `pallas_call`
    cannot state its outputs' varying axes."""
    mesh = active_mesh()
    if mesh is None:
        return fn(*args)

    def spec(names, shape):
        return logical_to_spec(names, shape, mesh, rules, what="per_shard operand", strict=strict)

    if out_shapes is None:
        out_shapes = jax.tree.map(lambda a: a.shape, jax.eval_shape(fn, *args))
    if _is_names(out_names):
        out_specs = spec(out_names, out_shapes)
    else:
        out_specs = tuple(spec(n, s) for n, s in zip(out_names, out_shapes, strict=True))
    in_specs = tuple(spec(n, a.shape) for a, n in zip(args, in_names, strict=True))
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
    )(*args)


# --- varying axes -----------------------------------------------------------------------------
def varying_axes(x: Any) -> frozenset[str]:
    """The mesh axes `x` varies over inside `shard_map` (empty elsewhere). jax keeps them in
    `aval.vma` or, in the 0.10 releases, `aval.manual_axis_type.varying`."""
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()))


def vary(x: jax.Array, axes: Iterable[str]) -> jax.Array:
    """`x` typed as varying over the manual mesh `axes` too (`lax.pcast`), e.g. a scan's
    zeros initial carry whose updates vary over them; unchanged where it already does."""
    have = varying_axes(x)
    missing = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent in its primal's dtype, summed over the mesh axes it varies over and the
    primal does not (inside `shard_map`: the transpose of the implicit broadcast)."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
    return (jax.lax.psum(ct, extra) if extra else ct).astype(primal.dtype)
