"""The pure train step, optimizer and checkpoint plumbing on the micro model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_scaled, max_rel_error
from train_helpers import micro_config, synthetic_store

from mla_moe import DeepSeekModel, losses
from mla_moe.data import PipelineConfig, TokenSplit, train_iterator
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import optimizer as optimizer_lib
from mla_moe.train import train_step as step_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    store = synthetic_store(str(tmp_path_factory.mktemp("data") / "store"))
    config = micro_config(store)
    cfg = config_lib.validate(config)
    tx, schedule = optimizer_lib.make_optimizer(config.train)
    graphdef, _, _ = step_lib.abstract_model(cfg)
    state = jax.jit(step_lib.make_init_fn(cfg, tx, seed=0))()
    split = TokenSplit(store, "train")
    it = train_iterator(split, PipelineConfig(seq_len=32, global_batch=8, seed=0))
    batches = [jax.tree.map(jnp.asarray, next(it)) for _ in range(2)]
    return dict(
        config=config,
        cfg=cfg,
        tx=tx,
        schedule=schedule,
        graphdef=graphdef,
        state=state,
        batches=batches,
        split=split,
    )


def test_schedule_warmup_then_cosine():
    t = micro_config().train
    t.steps, t.warmup_steps, t.learning_rate, t.min_lr_ratio = 100, 10, 1e-3, 0.1
    sched = optimizer_lib.learning_rate_schedule(t)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(55)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # half-way
    np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-6)


def test_no_weight_decay_on_norms_and_vectors(setup):
    mask = ckpt_lib.flatten_state(optimizer_lib.decay_mask(setup["state"]["params"]))
    params = ckpt_lib.flatten_state(setup["state"]["params"])
    norms = [k for k in mask if "norm" in k]
    assert norms and not any(mask[k] for k in norms)
    assert all(mask[k] == (params[k].ndim >= 2 and "norm" not in k) for k in mask)
    assert any(mask.values())
    # Decay actually moves a matrix and not a norm scale when the gradient is zero.
    t = micro_config().train
    t.weight_decay, t.learning_rate, t.warmup_steps = 0.5, 0.1, 0
    tx, _ = optimizer_lib.make_optimizer(t)
    p = setup["state"]["params"]
    zero = jax.tree.map(jnp.zeros_like, p)
    upd, _ = tx.update(zero, tx.init(p), p)
    upd = ckpt_lib.flatten_state(upd)
    assert all(float(jnp.abs(upd[k]).max()) == 0.0 for k in norms)
    assert any(float(jnp.abs(upd[k]).max()) > 0 for k in upd if mask[k])


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Every balance and z loss on, weighted so that each moves the router's gradient.
BALANCE = dict(
    aux_loss_alpha=0.01,
    device_balance_alpha=0.01,
    comm_balance_alpha=0.01,
    seq_balance_alpha=0.01,
    router_z_loss_coef=1e-3,
)
# Accumulated against whole-batch gradients: the same float32 sums, split in two and added in
# another order. Bound: 2^7 float32 roundings (eps 1.2e-7) of a leaf's largest entry; measured
# up to 1.0e-6 (it was 1.2e-2 when the MTP loss was a mean of the micro-batches' means).
ACCUM_REL = 2**7 * float(np.finfo(np.float32).eps)


def _uneven_halves(batch):
    """`batch` whose second half (the second of two micro-batches) is cut into 3-token
    documents, the first three of them with one weighted target each: a third of the first
    half's MTP targets, a tenth of its CE weight."""
    b, t = batch["inputs"].shape
    h = b // 2
    pos_T = np.arange(t) % 3
    second = {
        "segment_ids": np.arange(t) // 3 + 1,
        "positions": pos_T,
        "weights": ((pos_T == 0) & (np.arange(t) < 9)).astype(np.float32),
    }
    out = dict(batch)
    for k, v in second.items():
        out[k] = jnp.concatenate([batch[k][:h], jnp.broadcast_to(v, (h, t)).astype(batch[k].dtype)])
    return out


def _init_sharp_indexer(cfg):
    """(params, extra) of a V3.2 model whose indexer queries are 10x their initial size: peaked
    index scores, so that the KL to the (near uniform) attention is far from 0."""
    params, extra = jax.jit(
        lambda: nnx.split(DeepSeekModel(cfg, rngs=nnx.Rngs(params=0)), nnx.Param, ...)[1:]
    )()

    def sharpen(path, x):
        return x * 10 if "indexer" in str(path) and "wq_b" in str(path) else x

    return jax.tree_util.tree_map_with_path(sharpen, params), extra


def _accumulated_grads(cfg, params, extra, batch, accum, dsa_stage="off"):
    f = jax.jit(
        functools.partial(
            step_lib._grads_and_aux,
            graphdef=step_lib.abstract_model(cfg)[0],
            cfg=cfg,
            step_cfg=step_lib.StepConfig(grad_accum_steps=accum, dsa_stage=dsa_stage),
        ),
        compiler_options=FAST_COMPILE,
    )
    loss, aux, grads = jax.device_get(f(params, extra, batch))
    return loss, aux, ckpt_lib.flatten_state(grads)


def _halves_balance_minus_whole(cfg, params, extra, batch):
    """(value, gradient) of the mean of the two halves' balance losses minus the whole
    batch's: what seq_aux=False's per-micro-batch definition adds to the whole-batch loss."""
    graphdef = step_lib.abstract_model(cfg)[0]

    def balance(params, b):
        out = nnx.merge(graphdef, params, extra)(
            b["inputs"], positions_BT=b["positions"], segment_ids_BT=b["segment_ids"], logits=False
        )
        return out.aux_loss

    def delta(params):
        h = batch["inputs"].shape[0] // 2
        halves = [jax.tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, h), slice(h, None))]
        return sum(balance(params, b) for b in halves) / 2 - balance(params, batch)

    value, grads = jax.device_get(
        jax.jit(jax.value_and_grad(delta), compiler_options=FAST_COMPILE)(params)
    )
    return value, ckpt_lib.flatten_state(grads)


@pytest.mark.parametrize("case", ["v3_per_sequence_balance", "v32_batch_balance"])
def test_gradient_accumulation_equals_whole_batch(setup, case):
    """Two micro-batches of very different valid-token counts against the whole batch: the
    loss, every gradient leaf and the logged losses. The micro model with MTP and every
    balance loss per sequence (seq_aux): all exact. A V3.2 micro model (the indexer's KL in
    the loss, sparse attention) with batch-wise balance losses (seq_aux=False): those are the
    micro-batches' mean by definition (train/config.py), the rest exact; its dense layer is
    dropped (one MoE decoder layer and the MTP module's: a third less to compile), as neither
    property depends on the depth."""
    batch = _uneven_halves(setup["batches"][0])
    h = batch["inputs"].shape[0] // 2
    _, valid = losses.mtp_targets(batch["inputs"], 1, batch["segment_ids"])
    assert int(valid[:h].sum()) > 2.5 * int(valid[h:].sum())
    assert float(batch["weights"][:h].sum()) > 8 * float(batch["weights"][h:].sum())
    if case == "v3_per_sequence_balance":
        cfg, dsa_stage = setup["cfg"].replace(**BALANCE), "off"
        params, extra = setup["state"]["params"], setup["state"]["extra"]
    else:
        cfg = setup["cfg"].replace(
            **BALANCE, seq_aux=False, index_n_heads=4, index_head_dim=16, index_topk=8,
            num_hidden_layers=1, first_k_dense_replace=0,
        )
        dsa_stage = "sparse"
        params, extra = _init_sharp_indexer(cfg)
    whole = _accumulated_grads(cfg, params, extra, batch, 1, dsa_stage)
    split = _accumulated_grads(cfg, params, extra, batch, 2, dsa_stage)
    loss, aux, grads = whole
    if not cfg.seq_aux:
        delta, delta_grads = _halves_balance_minus_whole(cfg, params, extra, batch)
        # The definition moves the routers' gradients by far more than rounding.
        moved = max(
            max_rel_error(grads[k] + delta_grads[k], grads[k]) for k in grads if "router" in k
        )
        assert moved > 100 * ACCUM_REL, moved  # measured 0.13
        loss = loss + delta
        grads = jax.tree.map(np.add, grads, delta_grads)
        aux = dict(aux, aux_loss=aux["aux_loss"] + delta)
    assert_close_scaled(split[0], loss, rel=ACCUM_REL, err_msg="loss")
    assert_close_scaled(split[2], grads, rel=ACCUM_REL, err_msg="grads")
    names = ["ce_sum", "weight_sum", "aux_loss", "mtp_loss", "indexer_loss"]
    names += ["aux_losses"] if cfg.seq_aux else []  # by name: only the total has a `delta`
    assert_close_scaled(
        {k: split[1][k] for k in names},
        {k: aux[k] for k in names},
        rel=ACCUM_REL,
        err_msg="metrics",
    )
    assert float(aux["mtp_loss"]) > 0
    # Measured 2e-3 with the sharpened indexer (5e-5 without).
    assert (float(aux["indexer_loss"]) > 1e-3) == (dsa_stage != "off")
    # Token counts are summed over micro-batches: the same totals as one big batch.
    for c1, c2 in zip(whole[1]["tokens_per_expert"], split[1]["tokens_per_expert"], strict=True):
        np.testing.assert_array_equal(c1, c2)


def test_train_step_bias_update_and_nonfinite_guard(setup):
    cfg = setup["cfg"]
    step = jax.jit(
        functools.partial(
            step_lib.train_step,
            graphdef=setup["graphdef"],
            cfg=cfg,
            tx=setup["tx"],
            schedule=setup["schedule"],
            step_cfg=step_lib.StepConfig(),
        )
    )
    s0 = jax.tree.map(jnp.copy, setup["state"])
    s1, m1 = step(s0, setup["batches"][0], 2)
    assert bool(m1["finite"]) and int(s1["step"]) == 1
    assert np.isfinite(float(m1["loss"])) and float(m1["loss"]) > 0
    # One MoE decoder layer plus the MTP module's MoE layer.
    assert m1["expert_load_max"].shape == (2,) and m1["drop_fraction"].shape == (2,)
    b0 = ckpt_lib.flatten_state(setup["state"]["extra"])
    b1 = ckpt_lib.flatten_state(s1["extra"])
    assert b0, "the micro model has expert biases"
    for k in b0:  # bias += rate * sign(mean - count): every entry moves by exactly +-rate or 0
        delta = np.abs(np.asarray(b1[k]) - np.asarray(b0[k]))
        assert np.all(np.isclose(delta, cfg.expert_bias_update_rate) | (delta == 0)), k
        assert delta.max() > 0
    p1 = ckpt_lib.flatten_state(s1["params"])
    s1_copy = jax.tree.map(jnp.copy, s1)
    s2, m2 = step(s1_copy, setup["batches"][1], 2)  # poisoned step
    assert not bool(m2["finite"]) and int(s2["step"]) == 2
    for k, v in ckpt_lib.flatten_state(s2["params"]).items():
        np.testing.assert_array_equal(v, p1[k])  # untouched


def test_checkpoint_round_trip_with_iterator(setup, tmp_path):
    state = setup["state"]
    it = train_iterator(setup["split"], PipelineConfig(seq_len=32, global_batch=8, seed=0))
    for _ in range(3):
        next(it)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), setup["config"].checkpoint)
    ck.save(7, state, it, force=True)
    ck.wait()
    expected = next(it)
    assert ck.latest_step() == 7
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    it2 = train_iterator(setup["split"], PipelineConfig(seq_len=32, global_batch=8, seed=0))
    restored = ck.restore(7, abstract, it2)
    ck.close()
    flat_a, flat_b = ckpt_lib.flatten_state(state), ckpt_lib.flatten_state(restored)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k])
    assert isinstance(restored["params"], nnx.State)
    np.testing.assert_array_equal(next(it2)["inputs"], expected["inputs"])


def test_incompatible_fields():
    a = micro_config().to_dict()
    b = micro_config().to_dict()
    b["mesh"]["data"] = 2
    b["train"]["steps"] = 99
    assert config_lib.incompatible_fields(a, b) == []
    b["model"]["hidden_size"] = 96
    b["train"]["seq_len"] = 64
    diffs = config_lib.incompatible_fields(a, b)
    assert diffs == ["model.hidden_size: 64 -> 96", "train.seq_len: 32 -> 64"]


def _specs(tree) -> set:
    return {s.spec for s in jax.tree.leaves(tree)}


def test_build_is_cached_per_logical_rules():
    """`trainer.build` is cached; the rules in effect change the layout, so a build under other
    rules must not reuse the first one's shardings or its traced steps."""
    from mla_moe import sharding
    from mla_moe.train import trainer

    config = micro_config()
    with trainer.run_mesh(config) as (_, mesh):  # data=8: the batch over `data`
        default = trainer.build(config, mesh)
        assert trainer.build(config, mesh) is default
        with sharding.use_rules({"embed": "data", "batch": None}):
            other = trainer.build(config, mesh)
    assert other is not default
    assert default.batch_sh.spec == jax.sharding.PartitionSpec("data")
    assert other.batch_sh.spec == jax.sharding.PartitionSpec(None)
    assert not any("data" in str(s) for s in _specs(default.state_sh))
    assert any("data" in str(s) for s in _specs(other.state_sh))
