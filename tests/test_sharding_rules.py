"""The rules table, parameter shardings (golden table), mesh validation, sharded init/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tolerance import assert_close_scaled

from mla_moe import DeepSeekModel, ModelConfig, sharding

SMALL = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, topk_method="noaux_tc", scoring_func="sigmoid",
    n_group=2, topk_group=1, norm_topk_prob=True, num_nextn_predict_layers=1,
)

# Every parameter of SMALL on the mesh fsdp=2 x expert=2 x tensor=2 with the default rules.
# Stacked layer groups carry a leading (replicated) "layers" dimension.
# The latent ranks Q and C are split over fsdp (the up-projections and their norms); in the
# down-projections fsdp is already taken by the model dim, so the latent dim stays whole.
_LAYER = {
    "attn.kv_norm.weight": ("fsdp",),
    "attn.q_norm.weight": ("fsdp",),
    "attn.wk_b_CNH": ("fsdp", "tensor", None),
    "attn.wkv_a_DL": ("fsdp", None),
    "attn.wo_NVD": ("tensor", None, "fsdp"),
    "attn.wq_a_DQ": ("fsdp", None),
    "attn.wq_b_QNA": ("fsdp", "tensor", None),
    "attn.wv_b_CNV": ("fsdp", "tensor", None),
    "attn_norm.weight": (None,),
    "ffn_norm.weight": (None,),
}
_DENSE = {
    "ffn.down_FD": ("tensor", "fsdp"),
    "ffn.gate_DF": ("fsdp", "tensor"),
    "ffn.up_DF": ("fsdp", "tensor"),
}
_MOE = {
    "ffn.down_EFD": ("expert", "tensor", "fsdp"),
    "ffn.gate_EDF": ("expert", "fsdp", "tensor"),
    "ffn.up_EDF": ("expert", "fsdp", "tensor"),
    "ffn.router.e_score_correction_bias": (None,),
    "ffn.router.w_DE": ("fsdp", None),
    "ffn.shared.down_FD": ("tensor", "fsdp"),
    "ffn.shared.gate_DF": ("fsdp", "tensor"),
    "ffn.shared.up_DF": ("fsdp", "tensor"),
}
GOLDEN = {
    "embed_UD": ("tensor", "fsdp"),
    "head_DU": ("fsdp", "tensor"),
    "norm.weight": (None,),
    "mtp.0.eh_proj_2DD": (None, "fsdp"),
    "mtp.0.enorm.weight": (None,),
    "mtp.0.hnorm.weight": (None,),
    "mtp.0.norm.weight": (None,),
    **{f"groups.0.{k}": (None, *v) for k, v in {**_LAYER, **_DENSE}.items()},
    **{f"groups.1.{k}": (None, *v) for k, v in {**_LAYER, **_MOE}.items()},
    **{f"mtp.0.layer.{k}": v for k, v in {**_LAYER, **_MOE}.items()},
}
EXPERT_WEIGHTS = ("gate_EDF", "up_EDF", "down_EFD")


def _jit_init(cfg, seed):
    """The model built by one jitted init (far faster on CPU than hundreds of eager ops)."""
    make = lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef = nnx.split(nnx.eval_shape(make))[0]
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def _abstract_state(cfg=SMALL):
    return nnx.state(nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0))))


def test_golden_partition_specs():
    mesh = sharding.make_mesh(dict(fsdp=2, expert=2, tensor=2), config=SMALL)
    specs = sharding.partition_specs(_abstract_state(), mesh)
    assert set(specs) == set(GOLDEN)
    for path, spec in specs.items():
        assert spec == P(*GOLDEN[path]), path


def test_rules_override_and_size_one_axes():
    rules = sharding.make_rules({"embed": None, "exp": ("expert", "fsdp")})
    mesh = sharding.make_mesh(dict(fsdp=2, expert=4), config=SMALL)
    specs = sharding.partition_specs(_abstract_state(), mesh, rules)
    assert specs["groups.1.ffn.gate_EDF"] == P(None, ("expert", "fsdp"), None, None)
    assert specs["embed_UD"] == P(None, None)  # tensor=1 is left out, embed now replicated
    with sharding.use_rules(rules):
        assert sharding.current_rules()["exp"] == ("expert", "fsdp")
    assert sharding.current_rules()["exp"] == ("expert",)
    with pytest.raises(ValueError, match="rules\\['embed'\\].*unknown mesh axis 'model'"):
        sharding.make_rules({"embed": "model"})
    # A mesh axis is used once per array: the second dimension asking for it stays replicated.
    spec = sharding.logical_to_spec(("heads", "mlp"), (4, 8), mesh=jax.make_mesh(
        (2, 1, 1, 1, 4), sharding.MESH_AXES), rules=sharding.make_rules())
    assert spec == P("tensor", None)


def test_weights_in_use_are_gathered_over_the_axes_that_only_store_them():
    """`sharding.gathered`: a weight's fsdp (and context) shards gathered where it is used, its
    tensor split kept; the value is unchanged; a no-op without a mesh."""
    mesh = sharding.make_mesh(dict(fsdp=2, context=2, tensor=2), config=SMALL)
    w_DN = jnp.arange(8.0 * 4).reshape(8, 4)
    with sharding.use_mesh(mesh):
        stored = sharding.logical_to_spec(("embed", "heads"), w_DN.shape, mesh)
        w_DN_stored = jax.device_put(w_DN, jax.sharding.NamedSharding(mesh, stored))
        used = jax.jit(lambda w: sharding.gathered(w * 1.0, ("embed", "heads")))(w_DN_stored)
    assert stored == P(("fsdp", "context"), "tensor")
    assert used.sharding.spec == P(None, "tensor")
    np.testing.assert_array_equal(np.asarray(used), np.asarray(w_DN))
    assert sharding.gathered(w_DN, ("embed", "heads")) is w_DN


def test_expert_weight_bytes_drop_by_expert_parallel_degree():
    """Compiled memory analysis: per-device expert weight bytes / EP."""
    flat = [(p, v) for p, v in nnx.to_flat_state(_abstract_state()) if p[-1] in EXPERT_WEIGHTS]
    experts = nnx.from_flat_state(flat)
    total = sum(v.size * v.dtype.itemsize for _, v in flat)

    def per_device_bytes(mesh_shape):
        mesh = sharding.make_mesh(mesh_shape, config=SMALL)
        sh = sharding.state_shardings(experts, mesh)
        compiled = jax.jit(lambda s: jax.tree.map(lambda a: a * 2, s), in_shardings=(sh,),
                           out_shardings=sh).lower(experts).compile()
        return compiled.memory_analysis().argument_size_in_bytes

    assert per_device_bytes(dict(data=8)) == total
    for ep in (2, 4, 8):
        assert per_device_bytes(dict(data=8 // ep, expert=ep)) * ep == total


@pytest.mark.parametrize(
    "mesh_cfg, message",
    [
        (dict(data=2, expert=2), r"mesh data=2 x fsdp=1 x expert=2 x context=1 x tensor=1 "
                                 r"needs 4 devices, but there are 8"),
        (dict(data=3, expert=-1), r"mesh.expert=-1: 8 devices are not divisible"),
        (dict(data=-1, expert=-1), r"only one mesh axis may be -1"),
        (dict(data=0, expert=8), r"mesh.data must be a positive integer or -1"),
        (dict(tensor=8), r"mesh.tensor=8 does not divide num_attention_heads=4"),
    ],
)
def test_bad_mesh_fails_before_compilation(mesh_cfg, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(mesh_cfg, config=SMALL)


def test_validate_mesh_reads_the_rules_in_force():
    """The mesh's own `rules` overrides (mesh.rules, as the trainer activates them) or, without
    them, the rules in effect decide which mesh axes each model dimension must divide by."""
    import ml_collections

    with pytest.raises(ValueError, match=r"mesh.tensor=8 does not divide num_attention_heads=4"):
        sharding.make_mesh(dict(tensor=8), config=SMALL)
    sharding.make_mesh(dict(tensor=8, rules={"heads": None}), config=SMALL)  # heads replicated
    sharding.make_mesh(ml_collections.ConfigDict(dict(tensor=8, rules={"heads": "data"})),
                       config=SMALL)
    sharding.make_mesh(dict(expert=8), config=SMALL)  # heads are not split over expert ...
    with pytest.raises(ValueError, match=r"mesh.expert=8 does not divide num_attention_heads=4"):
        sharding.make_mesh(dict(expert=8, rules={"heads": "expert"}), config=SMALL)
    with sharding.use_rules({"heads": "expert"}), pytest.raises(
            ValueError, match=r"mesh.expert=8 does not divide num_attention_heads=4"):
        sharding.make_mesh(dict(expert=8), config=SMALL)  # ... unless the rules say so
    with pytest.raises(ValueError, match=r"mesh.expert=4 x mesh.fsdp=2 does not divide "
                                         r"n_routed_experts=4"):
        sharding.make_mesh(dict(expert=4, fsdp=2, rules={"exp": ("expert", "fsdp")}),
                           config=SMALL.replace(n_routed_experts=4, n_group=1, topk_group=1))


def test_experts_not_divisible_by_expert_axis():
    cfg = SMALL.replace(n_routed_experts=12, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match=r"mesh.expert=8 does not divide n_routed_experts=12"):
        sharding.make_mesh(dict(expert=8), config=cfg)
    # Without the config check, the per-parameter check still names axis and dimension.
    mesh = sharding.make_mesh(dict(expert=8))
    with pytest.raises(ValueError, match=r"groups\.1\.ffn\.\w+_E\w+: dimension 1 \('exp', size "
                                         r"12\) is not divisible by mesh\.expert=8"):
        sharding.state_shardings(_abstract_state(cfg), mesh)


def test_expert_devices_must_match_mesh():
    with pytest.raises(ValueError, match=r"expert_devices=2 disagrees with mesh.expert=4"):
        sharding.make_mesh(dict(data=2, expert=4), config=SMALL.replace(expert_devices=2))


def test_constrain_is_noop_without_mesh_and_shards_with_one():
    x = jax.random.normal(jax.random.key(0), (8, 4, 32))
    assert sharding.active_mesh() is None
    assert sharding.constrain(x, ("batch", "length", "act_embed")) is x
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    with sharding.use_mesh(mesh):
        y = jax.jit(lambda x: sharding.constrain(x * 1.0, ("batch", "length", "act_heads")))(x)
        # tensor=2 does not divide 3: that dimension is left unconstrained, not an error
        z = jax.jit(lambda x: sharding.constrain(x * 1.0, ("batch", "act_heads", None)))(
            x[:, :3])
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    assert z.sharding.shard_shape(z.shape)[:2] == (2, 3)
    np.testing.assert_array_equal(y, x)


def test_init_sharded_matches_unsharded_init(saved_small):
    _, want = saved_small  # the same model (seed 5) built unsharded
    mesh = sharding.make_mesh(dict(fsdp=2, expert=2, tensor=2), config=SMALL)
    model = sharding.init_sharded(lambda: DeepSeekModel(SMALL, rngs=nnx.Rngs(5)), mesh)
    flat = nnx.to_flat_state(nnx.state(model))
    assert len(flat) == len(GOLDEN)
    for path, v in flat:
        key = ".".join(map(str, path))
        assert v[...].sharding.spec == P(*GOLDEN[key]), key
        split = np.prod([mesh.shape[ax] for ax in GOLDEN[key] if ax])
        assert v[...].addressable_shards[0].data.size * split == v[...].size, key
        assert_close_scaled(np.asarray(v[...]), np.asarray(want[path][...]), rel=1e-6,
                            err_msg=key)


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    from mla_moe.hf import save_pretrained

    path = tmp_path_factory.mktemp("small")
    model = _jit_init(SMALL, 5)
    save_pretrained(model, path)
    return path, dict(nnx.to_flat_state(jax.device_get(nnx.state(model))))


def _check_loaded(saved, mesh_shape):
    from mla_moe.hf import load_pretrained

    path, want = saved
    mesh = sharding.make_mesh(mesh_shape, config=SMALL)
    loaded = load_pretrained(path, mesh=mesh)
    n_split = 0
    for p, v in nnx.to_flat_state(nnx.state(loaded)):
        key = ".".join(map(str, p))
        assert v[...].sharding == sharding.variable_sharding(v, mesh), key
        n_split += v[...].sharding.spec != P(*([None] * v[...].ndim))
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(want[p][...]), key)
    assert n_split > 10


def test_load_pretrained_places_each_tensor_in_its_sharding(saved_small):
    # fsdp + tensor on everything but the routed experts' inner dims, experts over `expert`.
    with sharding.use_rules({"moe_mlp": None, "embed": None, "vocab": "fsdp"}):
        _check_loaded(saved_small, dict(fsdp=2, expert=2, tensor=2))


def test_load_pretrained_expert_inner_dims_sharded(saved_small):
    _check_loaded(saved_small, dict(fsdp=2, expert=2, tensor=2))


def test_state_shardings_of_a_train_state():
    """Optimizer moments keep the Param wrappers, so they shard like the params; plain leaves
    (the step) are replicated."""
    import optax

    mesh = sharding.make_mesh(dict(data=2, expert=4), config=SMALL)
    params = nnx.state(nnx.eval_shape(lambda: DeepSeekModel(SMALL, rngs=nnx.Rngs(0))),
                       nnx.Param)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(optax.adam(1e-3).init, params)}
    sh = sharding.state_shardings(state, mesh)
    assert jax.tree.structure(sh) == jax.tree.structure(state)
    assert sh["step"].spec == P()
    mu = sh["opt_state"][0].mu
    assert mu["groups"][1]["ffn"]["gate_EDF"].get_value().spec == P(None, "expert", None, None)
    assert sh["params"]["embed_UD"].get_value().spec == P(None, None)


def test_batch_is_split_over_every_axis_but_tensor():
    """Outside the experts each device computes only its own tokens: the batch rule carries
    data, fsdp and expert; a batch they do not divide keeps the leading axes that do."""
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2), config=SMALL)
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"))
    assert sharding.logical_to_spec(("batch", "length"), (4, 16), mesh, strict=False) == P(
        ("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", "length"), (3, 16), mesh, strict=False) == P(
        None, None)
    with pytest.raises(ValueError, match=r"dimension 0 \('batch', size 4\)"):
        sharding.logical_to_spec(("batch",), (4,), mesh)


def test_context_mesh_on_a_torus_may_split_a_dimension():
    """fsdp=128 x context=4 on v5p:8x8x8 needs one torus dimension split 2 x 4, which jax's
    own assignment refuses: the mesh is jax's fsdp=512 mesh with that axis split, context
    minor, so each sequence's 4 chips are neighbours and both axes together are one fsdp
    axis's devices in order."""
    from pallas_kernels import targets

    mesh = sharding.make_mesh(dict(fsdp=-1, context=4), devices=targets.devices("tpu:v5p:8x8x8"))
    assert dict(mesh.shape) == dict(data=1, fsdp=128, expert=1, context=4, tensor=1)
    assert len({d.id for d in mesh.devices.flat}) == 512
    whole = sharding.make_mesh(dict(fsdp=-1), devices=targets.devices("tpu:v5p:8x8x8"))
    assert [d.id for d in mesh.devices.flat] == [d.id for d in whole.devices.flat]
    for group in mesh.devices.reshape(128, 4)[::37]:
        coords = np.array([d.coords for d in group])
        assert (np.abs(np.diff(coords, axis=0)).sum(axis=1) == 1).all(), coords
