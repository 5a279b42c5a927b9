"""`train.moment_dtype`: Adam moments stored in bfloat16, updated in float32.

The slow twin is AdamW written out by hand below (clipping, bias correction, decay mask,
schedule); the bfloat16 optimizer must match it given the same stored moments, and must stay
within bfloat16 rounding of the float32 optimizer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerance import assert_close_scaled
from train_helpers import micro_config, synthetic_store

from mla_moe.data import PipelineConfig, TokenSplit, global_batch, train_iterator
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import optimizer as optimizer_lib
from mla_moe.train import trainer
from mla_moe.train.config import ConfigError

BF16_ULP = 2.0**-8  # spacing of bfloat16 numbers in [1, 2): 8 bits of mantissa


def _train_cfg(moment_dtype):
    t = micro_config().train
    # Clipping that binds (the gradients below have a norm of ~20), decay on, mid-warmup.
    t.update(moment_dtype=moment_dtype, grad_clip_norm=1.0, weight_decay=0.1,
             learning_rate=1e-2, warmup_steps=10, steps=100)
    return t


def _params_and_grads(seed, steps):
    keys = jax.random.split(jax.random.key(seed), 4 + 3 * steps)
    params = {"w_DF": jax.random.normal(keys[0], (64, 96)),
              "norm_scale": 1.0 + 0.1 * jax.random.normal(keys[1], (64,)),
              "bias": 0.1 * jax.random.normal(keys[2], (96,))}
    scales = {"w_DF": 1.0, "norm_scale": 0.1, "bias": 3.0}
    grads = [{k: scales[k] * jax.random.normal(keys[4 + 3 * i + j], v.shape)
              for j, (k, v) in enumerate(params.items())} for i in range(steps)]
    return params, grads


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    return opt_state[1][0]  # (clip, (adam, decay, schedule))


def _as_dtypes_of(template, state):
    return jax.tree.map(lambda t, s: s.astype(t.dtype), template, state)


def _reference_adamw(grads, adam: optax.ScaleByAdamState, params, t):
    """AdamW by hand, in float32 from the stored moments: (updates, new mu, new nu, both
    rounded to the stored dtype)."""
    norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in grads.values()))
    clip = jnp.minimum(1.0, t.grad_clip_norm / norm)
    count = int(adam.count) + 1
    lr = optimizer_lib.learning_rate_schedule(t)(count - 1)
    updates, mu, nu = {}, {}, {}
    for k, g in grads.items():
        g = g * clip
        m = t.b1 * adam.mu[k].astype(jnp.float32) + (1 - t.b1) * g
        v = t.b2 * adam.nu[k].astype(jnp.float32) + (1 - t.b2) * g * g
        step = (m / (1 - t.b1**count)) / (jnp.sqrt(v / (1 - t.b2**count)) + t.eps)
        decays = params[k].ndim >= 2 and "norm" not in k
        updates[k] = -lr * (step + (t.weight_decay * params[k] if decays else 0.0))
        mu[k], nu[k] = m.astype(adam.mu[k].dtype), v.astype(adam.nu[k].dtype)
    return updates, mu, nu


def test_moments_are_stored_in_the_asked_dtype():
    params, _ = _params_and_grads(0, 0)
    for name, dtype in optimizer_lib.MOMENT_DTYPES.items():
        tx, _ = optimizer_lib.make_optimizer(_train_cfg(name))
        adam = _adam_state(jax.eval_shape(tx.init, params))
        assert {a.dtype for a in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(dtype)}
        assert adam.count.dtype == jnp.int32


def test_float32_is_the_unchanged_adamw_chain():
    """moment_dtype=float32 is exactly the chain it replaced: clipping then optax.adamw."""
    t = _train_cfg("float32")
    params, grads = _params_and_grads(1, 3)
    schedule = optimizer_lib.learning_rate_schedule(t)
    old = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), optax.adamw(
        schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
        mask=optimizer_lib.decay_mask))
    new, _ = optimizer_lib.make_optimizer(t)
    s_old, s_new = old.init(params), new.init(params)
    old_update, new_update = jax.jit(old.update), jax.jit(new.update)
    for g in grads:
        u_old, s_old = old_update(g, s_old, params)
        u_new, s_new = new_update(g, s_new, params)
        jax.tree.map(np.testing.assert_array_equal, (u_new, s_new), (u_old, s_old))


def test_bfloat16_step_matches_reference_and_float32():
    params, grads = _params_and_grads(2, 4)
    t32, t16 = _train_cfg("float32"), _train_cfg("bfloat16")
    tx32, _ = optimizer_lib.make_optimizer(t32)
    tx16, _ = optimizer_lib.make_optimizer(t16)
    update32 = jax.jit(tx32.update)
    s32 = tx32.init(params)
    for g in grads[:-1]:  # moments of a few float32 steps
        _, s32 = update32(g, s32, params)
    # The same state as bfloat16 would store it (same tree: checkpoints and specs match).
    s16 = _as_dtypes_of(tx16.init(params), s32)
    g = grads[-1]
    u32, n32 = update32(g, s32, params)
    u16, n16 = jax.jit(tx16.update)(g, s16, params)

    ref_u, ref_mu, ref_nu = _reference_adamw(g, _adam_state(s16), params, t16)
    adam16 = _adam_state(n16)
    assert {a.dtype for a in jax.tree.leaves((adam16.mu, adam16.nu))} == {jnp.dtype("bfloat16")}
    assert int(adam16.count) == len(grads)
    # Float32 arithmetic from the stored moments; measured: up to 3.8e-7 (f32 rounding).
    assert_close_scaled(u16, ref_u, rel=1e-5, err_msg="updates vs reference ")
    # Rounded to bfloat16 once: equal, or one bfloat16 step apart where the float32 values of
    # optax and the reference straddle a rounding boundary. Measured: 0.
    assert_close_scaled((adam16.mu, adam16.nu), (ref_mu, ref_nu), rel=BF16_ULP,
                        err_msg="moments vs reference ")
    # Against float32 moments: each stored moment is off by up to half a bfloat16 step
    # (2^-9 relative); |mu| <= ~1.2 sqrt(nu) for b1=0.9, b2=0.95, so the update moves by about
    # 2^-9 of its own size, plus half that from nu. Bound: 2 bfloat16 steps of the largest
    # update. Measured: up to 3.1e-3.
    assert_close_scaled(u16, u32, rel=2 * BF16_ULP, err_msg="updates vs float32 ")
    # The new moments: half a step from rounding the old ones (times b1 or b2) and half a step
    # from rounding the new ones; the old moments' largest value can exceed the new one's.
    # Bound: 2 bfloat16 steps of the largest new moment. Measured: up to 3.8e-3.
    adam32 = _adam_state(n32)
    assert_close_scaled((adam16.mu, adam16.nu), (adam32.mu, adam32.nu), rel=2 * BF16_ULP,
                        err_msg="moments vs float32 ")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(str(tmp_path_factory.mktemp("data") / "store"))


def _micro_bf16(store, **mesh):
    config = micro_config(store, train=dict(moment_dtype="bfloat16"), mesh=mesh)
    config.model.num_nextn_predict_layers = 0  # a smaller program to compile
    return config


def _same_arrays(actual: dict, expected: dict, spec: dict) -> None:
    assert actual.keys() == expected.keys() == spec.keys()
    for k, a in actual.items():
        assert a.dtype == spec[k].dtype and a.sharding == spec[k].sharding, k
        np.testing.assert_array_equal(np.asarray(a), np.asarray(expected[k]), err_msg=k)


def test_bfloat16_train_step_checkpoint_and_shardings(store, tmp_path):
    """The micro model with bfloat16 moments: a step runs on one device; its state survives
    save/restore bit for bit and continues exactly as the original; on data=2 x expert=4 the
    abstract state carries bfloat16 moments sharded like their params, and the checkpoint
    restores into that layout."""
    config = _micro_bf16(store, data=1, expert=1)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), config.checkpoint)
    with trainer.run_mesh(config, jax.devices()[:1]) as (_, mesh):
        built = trainer.build(config, mesh)
        spec = ckpt_lib.flatten_state(built.state_spec())
        it = train_iterator(TokenSplit(store, "train"),
                            PipelineConfig(seq_len=32, global_batch=8, seed=0))
        b1, b2 = (global_batch(next(it), built.batch_sh) for _ in range(2))
        state, m1 = built.step_fn(built.init_fn(), b1, np.int32(-1))
        assert bool(m1["finite"]) and int(state["step"]) == 1
        mu = ckpt_lib.flatten_state(_adam_state(state["opt_state"]).mu)
        assert all(v.dtype == jnp.bfloat16 for v in mu.values())
        assert all(float(jnp.abs(v).max()) > 0 for v in mu.values() if v.size > 1)
        saved = {k: np.asarray(v) for k, v in ckpt_lib.flatten_state(state).items()}
        ck.save(1, state, None, force=True)
        ck.wait()
        restored = ck.restore(1, built.state_spec(), None)
        _same_arrays(ckpt_lib.flatten_state(restored), saved, spec)
        s_a, m_a = built.step_fn(restored, b2, np.int32(-1))
        s_b, m_b = built.step_fn(state, b2, np.int32(-1))  # both donated
        assert float(m_a["total_loss"]) == float(m_b["total_loss"])
        jax.tree.map(np.testing.assert_array_equal, s_a, s_b)

    sharded = _micro_bf16(store, data=2, expert=4)
    with trainer.run_mesh(sharded) as (_, mesh8):
        spec8 = trainer.build(sharded, mesh8).state_spec()
        params = ckpt_lib.flatten_state(spec8["params"])
        assert any(p.sharding.spec != jax.sharding.PartitionSpec() for p in params.values())
        adam = _adam_state(spec8["opt_state"])
        for moment in (adam.mu, adam.nu):
            flat = ckpt_lib.flatten_state(moment)
            assert flat.keys() == params.keys()
            for k, p in params.items():
                assert flat[k].dtype == jnp.bfloat16 and p.dtype == jnp.float32, k
                assert flat[k].shape == p.shape and flat[k].sharding == p.sharding, k
        onto8 = ck.restore(1, spec8, None)
    ck.close()
    _same_arrays(ckpt_lib.flatten_state(onto8), saved, ckpt_lib.flatten_state(spec8))


def test_bad_moment_dtype_is_a_config_error():
    config = micro_config(train=dict(moment_dtype="float16"))
    with pytest.raises(ConfigError, match=r"train\.moment_dtype.*'float16'"):
        config_lib.validate(config)


def test_resuming_with_another_moment_dtype_is_refused():
    a = micro_config().to_dict()
    b = micro_config(train=dict(moment_dtype="bfloat16")).to_dict()
    assert config_lib.incompatible_fields(a, b) == [
        "train.moment_dtype: 'float32' -> 'bfloat16'"]
