"""Device meshes, the logical-axis rules table, and sharded initialisation.

Every parameter carries logical axis names (`nnx.Param(..., out_sharding=("exp", "embed",
"moe_mlp"))`); key activations are tagged with `constrain(x, ("batch", "length", "act_embed"))`.
One rules table maps each logical name to zero or more mesh axes of the five-axis mesh
`(data, fsdp, expert, context, tensor)`:

  batch (activations)        -> data, fsdp, expert  sequences are split over these axes
  length (activations)       -> context             each sequence's tokens (context_parallel.py)
  embed (weights' model dim) -> fsdp, context       FSDP: weights sharded, gathered where used
  q_lora, kv_lora            -> fsdp, context       the latent projections too (wq_b, wk_b, wv_b)
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
Raw `PartitionSpec`s are built only here: `per_shard` runs a function per shard with its specs
from logical names (the Pallas kernels, the blocked sparse attention, the fused loss, the MoE
exchange), under the rules in effect or a table of the caller's own.

Typical use:
    mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1), config=model_config)
    with use_mesh(mesh):                       # jax.set_mesh + the rules
        model = init_sharded(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0)), mesh)
        step = jax.jit(train_step, in_shardings=(state_shardings(state, mesh), ...))

For inference, `on_mesh(model, mesh)` places a model's weights by the same rules and
`place_cache(cache, mesh)` splits a latent cache over the batch axes.

Modules: axes.py (the rules table, which mesh axes split a dimension, specs), mesh.py (the
mesh and its checks), placement.py (shardings of parameters, states, caches, batches),
manual.py (`per_shard` and the varying-axis helpers of code inside `shard_map`).
"""

from mla_moe.sharding.axes import (
    DEFAULT_RULES,
    MESH_AXES,
    AxisRule,
    MeshLike,
    Rules,
    active_mesh,
    batch_axes,
    constrain,
    current_rules,
    data_parallel_size,
    describe_axes,
    dividing_axes,
    gathered,
    logical_to_spec,
    make_rules,
    mesh_axis_size,
    rule_axes,
    use_rules,
)
from mla_moe.sharding.manual import (
    PER_HEAD,
    PER_TOKEN,
    cotangent_like,
    per_shard,
    vary,
    varying_axes,
)
from mla_moe.sharding.mesh import (
    config_value,
    make_mesh,
    mesh_rules,
    mesh_shape,
    use_mesh,
    validate_mesh,
)
from mla_moe.sharding.placement import (
    abstract_model,
    batch_sharding,
    cache_shardings,
    init_sharded,
    on_mesh,
    partition_specs,
    place_cache,
    state_shardings,
    variable_sharding,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "PER_HEAD",
    "PER_TOKEN",
    "AxisRule",
    "MeshLike",
    "Rules",
    "abstract_model",
    "active_mesh",
    "batch_axes",
    "batch_sharding",
    "cache_shardings",
    "config_value",
    "constrain",
    "gathered",
    "cotangent_like",
    "current_rules",
    "data_parallel_size",
    "describe_axes",
    "dividing_axes",
    "init_sharded",
    "logical_to_spec",
    "make_mesh",
    "make_rules",
    "mesh_axis_size",
    "mesh_rules",
    "mesh_shape",
    "on_mesh",
    "partition_specs",
    "per_shard",
    "place_cache",
    "rule_axes",
    "state_shardings",
    "use_mesh",
    "use_rules",
    "validate_mesh",
    "variable_sharding",
    "varying_axes",
    "vary",
]
