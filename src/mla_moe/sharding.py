"""Device meshes, the logical-axis rules table, and sharded initialisation.

Every parameter carries logical axis names (`nnx.Param(..., out_sharding=("exp", "embed",
"moe_mlp"))`); key activations are tagged with `constrain(x, ("batch", "length", "act_embed"))`.
One rules table maps each logical name to zero or more mesh axes of the four-axis mesh
`(data, fsdp, expert, tensor)`:

  batch (activations)        -> data, fsdp, expert  tokens are split over every axis but tensor
  embed (weights' model dim) -> fsdp                FSDP: weights sharded, gathered where used
  q_lora, kv_lora            -> fsdp                the latent projections too (wq_b, wk_b, wv_b)
  exp                        -> expert              expert parallelism
  heads, mlp, moe_mlp, vocab -> tensor              tensor (Megatron) parallelism
  everything else            -> replicated

The batch is split over `expert` too: outside the routed experts every device computes
attention, dense layers, norms, embedding and loss for its own tokens only (without it the
devices along `expert` would repeat each other's work). The MoE `shard_map` takes the tokens
in that same layout and moves each one to its experts (moe_parallel.py).

Mesh axes of size 1 are left out of the specs, a mesh axis is used at most once per array
(a later dimension asking for an axis already taken stays replicated), and a weight dimension
that its mesh axes do not divide is an error naming the parameter, the dimension and the axis.
Raw `PartitionSpec`s are built only here and at the `shard_map` boundary in `moe_parallel`.

Typical use:
    mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1), config=model_config)
    with use_mesh(mesh):                       # jax.set_mesh + the rules
        model = init_sharded(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0)), mesh)
        step = jax.jit(train_step, in_shardings=(state_shardings(state, mesh), ...))

For inference, `on_mesh(model, mesh)` places a model's weights by the same rules and
`place_cache(cache, mesh)` splits a latent cache over the batch axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mla_moe import multislice

if TYPE_CHECKING:
    from mla_moe.config import ModelConfig

log = logging.getLogger(__name__)

# A concrete mesh, or the abstract one that `jax.set_mesh` makes visible while tracing.
MeshLike = jax.sharding.Mesh | jax.sharding.AbstractMesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")

AxisRule = tuple[str, tuple[str, ...]]

DEFAULT_RULES: tuple[AxisRule, ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # weights
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv", ()),
    ("q_lora", ("fsdp",)),
    ("kv_lora", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("exp", ("expert",)),
    ("moe_mlp", ("tensor",)),
    ("norm", ()),
)


class Rules(Mapping):
    """An immutable logical-name -> mesh-axes table (a Mapping of name -> tuple of axes)."""

    def __init__(self, pairs: Iterable[tuple[str, Any]]):
        table: dict[str, tuple[str, ...]] = {}
        for name, axes in pairs:
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


_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("mla_moe_rules",
                                                                     default=None)


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


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Rules | Mapping[str, Any] | None = None
             ) -> Iterator[jax.sharding.Mesh]:
    """`jax.set_mesh(mesh)` plus the rules: model code traced inside sees both."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield mesh


# --- the mesh ---------------------------------------------------------------------------------
def config_value(cfg: Any, name: str, default: Any = None) -> Any:
    """`cfg.name` of a mapping, ml_collections ConfigDict or object; `default` if absent."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Resolves `mesh.{data,fsdp,expert,tensor}` (-1: the remaining devices; missing: 1)."""
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


def validate_mesh(sizes: Mapping[str, int], config: ModelConfig) -> None:
    """Checks that the model's sharded dimensions divide by their mesh axes (no compile)."""
    c = config
    checks = [("tensor", "num_attention_heads", c.num_attention_heads)]
    if c.n_routed_experts:
        checks += [("expert", "n_routed_experts", c.n_routed_experts),
                   ("tensor", "moe_intermediate_size", c.moe_intermediate_size)]
        if c.n_shared_experts:
            checks.append(("tensor", "n_shared_experts * moe_intermediate_size",
                           c.n_shared_experts * c.moe_intermediate_size))
    if c.first_k_dense_replace or not c.n_routed_experts:
        checks.append(("tensor", "intermediate_size", c.intermediate_size))
    checks += [("tensor", "vocab_size", c.vocab_size), ("fsdp", "hidden_size", c.hidden_size)]
    for axis, field, dim in checks:
        n = sizes.get(axis, 1)
        if dim % n:
            raise ValueError(f"mesh.{axis}={n} does not divide {field}={dim}")
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


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None, *,
              config: ModelConfig | None = None) -> jax.sharding.Mesh:
    """A `(data, fsdp, expert, tensor)` mesh over `devices` (default: all, every process).

    mesh_cfg: a mapping or object with integer `data`, `fsdp`, `expert`, `tensor` (-1 = the
    rest) and optionally `dcn_data`, `dcn_fsdp` (default 1): how many ways those two axes
    extend across slices (`multislice.py`; the other sizes are then per slice). With `config`
    (a ModelConfig) the sharded dimensions are checked too. Axes are `Auto`: jitted functions
    state their in/out shardings, the compiler propagates the rest.
    """
    devices = jax.devices() if devices is None else list(devices)
    dcn = multislice.dcn_shape(mesh_cfg)
    granules = multislice.check_granules(dcn, devices)
    sizes = mesh_shape(mesh_cfg, len(devices) // math.prod(dcn.values()))
    sizes = {a: n * dcn.get(a, 1) for a, n in sizes.items()}
    if config is not None:
        validate_mesh(sizes, config)
    axis_types = (jax.sharding.AxisType.Auto,) * 4
    if granules is None:  # one slice: jax's topology-aware mesh, as ever
        shape = tuple(sizes[a] for a in MESH_AXES)
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return jax.sharding.Mesh(multislice.hybrid_devices(sizes, dcn, devices, granules),
                             MESH_AXES, axis_types=axis_types)


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


# --- logical names -> specs -------------------------------------------------------------------
_warned: set[str] = set()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: MeshLike,
                    rules: Rules | None = None, *, what: str = "array",
                    strict: bool = True) -> P:
    """The PartitionSpec of an array with logical axis `names` and `shape` on `mesh`.

    strict: a dimension its mesh axes do not divide raises (weights); otherwise that dimension
    is split over the longest leading run of its axes that divides it, possibly none
    (activations: e.g. a decode batch of 4 on fsdp=2 x expert=4 is split over fsdp only).
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
        axes = tuple(a for a in rules[name] if sizes.get(a, 1) > 1 and a not in used)
        n = math.prod(sizes[a] for a in axes)
        if size % n:
            if strict:
                raise ValueError(
                    f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible by "
                    + " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)
                )
            while axes and size % math.prod(sizes[a] for a in axes):
                axes = axes[:-1]  # the longest leading run of the axes that divides
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _names_of(variable) -> tuple | None:
    names = variable.get_metadata().get("out_sharding")
    if names is None or isinstance(names, (P, jax.sharding.Sharding)):
        return names
    return tuple(names)


def variable_sharding(variable: nnx.Variable, mesh: jax.sharding.Mesh,
                      rules: Rules | None = None, *, what: str = "parameter"
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
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None
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


def partition_specs(abstract_state: nnx.State, mesh: jax.sharding.Mesh,
                    rules: Rules | None = None) -> dict[str, P]:
    """{'dotted.path': PartitionSpec} for every Variable of an nnx state (for tables/tests)."""
    out = {}
    for path, v in nnx.to_flat_state(abstract_state):
        out[".".join(map(str, path))] = variable_sharding(
            v, mesh, rules, what=".".join(map(str, path))).spec
    return out


def abstract_model(make_model: Callable[[], nnx.Module]) -> nnx.Module:
    """`nnx.eval_shape(make_model)` that works inside `use_mesh` too: parameters carry
    logical axis names, which are not mesh axes, so the shapes are taken mesh-free."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(make_model)


def init_sharded(make_model: Callable[[], nnx.Module], mesh: jax.sharding.Mesh,
                 rules: Rules | None = None) -> nnx.Module:
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
def on_mesh(model: nnx.Module, mesh: jax.sharding.Mesh | None = None,
            rules: Rules | Mapping[str, Any] | None = None) -> Iterator[nnx.Module]:
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


def batch_axes(mesh: MeshLike | None = None, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch / token dimension."""
    mesh = active_mesh() if mesh is None else mesh
    if mesh is None:
        return ()
    rules = current_rules() if rules is None else rules
    sizes = dict(mesh.shape)
    return tuple(a for a in rules.get("batch", ()) if sizes.get(a, 1) > 1)


def data_parallel_size(mesh: MeshLike, rules: Rules | None = None) -> int:
    """How many ways the batch is split: the product of the `batch` rule's mesh axes."""
    sizes = dict(mesh.shape)
    return math.prod(sizes[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> NamedSharding:
    """The sharding of a [B, ...] input batch: its leading dimension is the logical `batch`
    axis, laid out by the rules like every other (B a multiple of `data_parallel_size`)."""
    rules = current_rules() if rules is None else rules
    names, shape = ("batch",), (data_parallel_size(mesh, rules),)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules, what="batch"))
