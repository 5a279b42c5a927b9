"""Where arrays live: the NamedShardings of parameters, train states, caches and batches from
their logical names, and a model initialised or placed in them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mla_moe.sharding.axes import Rules, current_rules, data_parallel_size, logical_to_spec
from mla_moe.sharding.mesh import use_mesh


def _names_of(variable) -> tuple | None:
    names = variable.get_metadata().get("out_sharding")
    if names is None or isinstance(names, (P, jax.sharding.Sharding)):
        return names
    return tuple(names)


def variable_sharding(
    variable: nnx.Variable,
    mesh: jax.sharding.Mesh,
    rules: Rules | None = None,
    *,
    what: str = "parameter",
) -> NamedSharding:
    """The NamedSharding of an (abstract or concrete) `nnx.Variable` from its logical names."""
    names = _names_of(variable)
    if names is None:
        return NamedSharding(mesh, P())
    if isinstance(names, NamedSharding):
        return names
    if isinstance(names, P):
        return NamedSharding(mesh, names)
    return NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh, rules, what=what))


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def state_shardings(
    abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None
) -> Any:
    """Shardings for every leaf of a pytree holding `nnx.Variable`s (an nnx.State, a train
    state dict with params / optimizer moments, ...): a Variable's leaf from its logical names,
    any other leaf (step counters, ...) replicated. Same tree structure as the input."""
    rules = current_rules() if rules is None else rules

    def one(path, x):
        if isinstance(x, nnx.Variable) and not jax.tree.leaves(x):
            return x  # no array (optax.MaskedNode: a frozen parameter's optimizer state)
        if isinstance(x, nnx.Variable):
            sh = variable_sharding(x, mesh, rules, what=_path_str(path))
            return jax.tree.map(lambda _: sh, x)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def partition_specs(
    abstract_state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules | None = None
) -> dict[str, P]:
    """{'dotted.path': PartitionSpec} for every Variable of an nnx state (for tables/tests)."""
    out = {}
    for path, v in nnx.to_flat_state(abstract_state):
        out[".".join(map(str, path))] = variable_sharding(
            v, mesh, rules, what=".".join(map(str, path))
        ).spec
    return out


def abstract_model(make_model: Callable[[], nnx.Module]) -> nnx.Module:
    """`nnx.eval_shape(make_model)` that works inside `use_mesh` too: parameters carry
    logical axis names, which are not mesh axes, so the shapes are taken mesh-free."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(make_model)


def init_sharded(
    make_model: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: Rules | None = None
) -> nnx.Module:
    """Builds `make_model()` directly in its sharded layout.

    `jax.eval_shape` gives the parameter shapes and logical names without allocating; the
    real init then runs under `jax.jit` with those out_shardings, so each device materialises
    only its own shards (no full copy on one device).
    """
    rules = current_rules() if rules is None else rules
    abstract = abstract_model(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(make_model())[1]

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


@contextlib.contextmanager
def on_mesh(
    model: nnx.Module,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | Mapping[str, Any] | None = None,
) -> Iterator[nnx.Module]:
    """Activates `mesh` (and the sharding `rules`) for the block and yields `model` with its
    state placed on it by the rules; a no-op yielding `model` when mesh is None. Weights
    already on the mesh (e.g. `load_pretrained(..., mesh=mesh)`) are not copied."""
    if mesh is None:
        yield model
        return
    with use_mesh(mesh, rules):
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, state_shardings(state, mesh))
        yield nnx.merge(graphdef, state)


_CACHE_NAMES = {3: ("batch", "length", None), 1: ("batch",)}  # latents [B, S, W], lengths [B]


def cache_shardings(cache: Any, mesh: jax.sharding.Mesh) -> Any:
    """The NamedShardings of a (concrete or abstract) latent cache on `mesh`: its batch
    dimension split by the `batch` rule where the mesh axes divide it, else replicated. MLA's
    cache has no head dimension, so tensor-parallel ranks each hold their rows' whole cache."""

    def one(x):
        spec = logical_to_spec(_CACHE_NAMES[x.ndim], x.shape, mesh, strict=False)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, cache)


def place_cache(cache: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """A latent cache (a `KVCache`, concrete) placed by `cache_shardings`; unchanged when mesh
    is None."""
    if mesh is None:
        return cache
    return jax.device_put(cache, cache_shardings(cache, mesh))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> NamedSharding:
    """The sharding of a [B, ...] input batch: its leading dimension is the logical `batch`
    axis, laid out by the rules like every other (B a multiple of `data_parallel_size`); on a
    mesh with `context` > 1 the batch is [B, T] and T is the logical `length` (split over
    `context`, T a multiple of 2 x context: context_parallel.py)."""
    rules = current_rules() if rules is None else rules
    names, shape = ("batch",), (data_parallel_size(mesh, rules),)
    context = dict(mesh.shape).get("context", 1)
    if context > 1:
        names, shape = names + ("length",), shape + (context,)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules, what="batch"))
