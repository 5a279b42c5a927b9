"""Chunked cross-entropy (the head applied a chunk of tokens at a time) equals the plain loss
over whole logits: value and gradients, main head and MTP, one device and a mesh, the train
step, and the memory it saves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerance import assert_close_scaled
from train_helpers import micro_config

from mla_moe import DeepSeekModel, losses, sharding
from mla_moe.errors import ConfigError
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import train_step as step_lib


def _inputs(seed, b, t, d, u, dtype=jnp.float32):
    """Hidden states, head weight, targets, and weights with some zeros."""
    k = jax.random.split(jax.random.key(seed), 5)
    x_BTD = jax.random.normal(k[0], (b, t, d), jnp.float32).astype(dtype)
    w_DU = jax.random.normal(k[1], (d, u), jnp.float32) / np.sqrt(d) * 3.0
    targets_BT = jax.random.randint(k[2], (b, t), 0, u)
    weights_BT = jax.random.uniform(k[3], (b, t)) * (jax.random.uniform(k[4], (b, t)) > 0.2)
    return x_BTD, w_DU, targets_BT, weights_BT


def _plain_ce(x_BTD, w_DU, targets_BT, weights_BT):
    logits_BTU = jnp.einsum("BTD,DU->BTU", x_BTD, w_DU.astype(x_BTD.dtype),
                            preferred_element_type=jnp.float32)
    return losses.cross_entropy(logits_BTU, targets_BT, weights_BT)


def _value_and_grads(loss_fn, x_BTD, w_DU, targets_BT, weights_BT):
    """((loss sum, weight sum), d(loss sum) / d(x, w, weights))."""
    f = jax.value_and_grad(lambda x, w, wt: loss_fn(x, w, targets_BT, wt), argnums=(0, 1, 2),
                           has_aux=True)
    return jax.jit(f)(x_BTD, w_DU, weights_BT)


# Over B=3 rows: T=24 in chunks of 8 positions; T=23 (no length in [4, 8] divides it) in 3
# chunks of 8, padded to 24; T=23 in 5 chunks of 5, padded to 25; one position per chunk.
@pytest.mark.parametrize("t, chunk_tokens", [(24, 24), (23, 24), (23, 15), (24, 5)])
def test_chunked_ce_matches_plain(t, chunk_tokens):
    x, w, tg, wt = _inputs(0, 3, t, 32, 96)
    want = _value_and_grads(_plain_ce, x, w, tg, wt)
    chunked = functools.partial(losses.chunked_cross_entropy, chunk_tokens=chunk_tokens)
    got = _value_and_grads(chunked, x, w, tg, wt)
    assert float(want[0][0]) > 0
    # Measured: up to 3.3e-7 (float32 rounding of the sums in another order).
    assert_close_scaled(got, want, rel=1e-5)


def test_chunks_divide_t_when_they_can():
    # 49,152 tokens per device as 12 rows of 4096 at chunk_tokens=8192: at most 682 positions,
    # 512 divides 4096.
    assert losses._num_chunks(4096, 682) == 8
    assert losses._num_chunks(24, 8) == 3 and losses._num_chunks(24, 5) == 6
    assert losses._num_chunks(23, 8) == 3 and losses._num_chunks(23, 5) == 5  # padded
    assert losses._num_chunks(13, 1) == 13 and losses._num_chunks(13, 13) == 1


def test_chunked_ce_bfloat16_matches_plain():
    x, w, tg, wt = _inputs(1, 2, 20, 32, 64, jnp.bfloat16)
    want = _value_and_grads(_plain_ce, x, w, tg, wt)
    chunked = functools.partial(losses.chunked_cross_entropy, chunk_tokens=14)
    got = _value_and_grads(chunked, x, w, tg, wt)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.float32
    # The same bf16 products with float32 accumulation; the head gradient is summed over
    # chunks in float32 and rounded to bf16 once, as the plain one. Measured: 0 (bitwise equal
    # here); the bound is one bf16 ulp (2^-8), for a backend that orders the sums otherwise.
    assert_close_scaled(got, want, rel=4e-3)


def test_one_chunk_and_unit_weights_by_default():
    x, w, tg, _ = _inputs(2, 2, 9, 16, 40)
    want = jax.jit(_plain_ce)(x, w, tg, None)
    got = jax.jit(functools.partial(losses.chunked_cross_entropy, chunk_tokens=1000))(x, w, tg)
    assert float(got[1]) == 18.0
    assert_close_scaled(got, want, rel=1e-6)  # measured: 0


def _mtp_inputs(seed, i, b, t, d, u):
    k = jax.random.split(jax.random.key(seed), 5)
    x_IBTD = jax.random.normal(k[0], (i, b, t, d))
    w_DU = jax.random.normal(k[1], (d, u)) / np.sqrt(d) * 3.0
    tokens_BT = jax.random.randint(k[2], (b, t), 0, u)
    # Two packed documents per row, a different split in each row; some zero weights.
    cut_B = jax.random.randint(k[3], (b, 1), 2, t - 2)
    segment_ids_BT = (jnp.arange(t)[None, :] >= cut_B).astype(jnp.int32) + 1
    weights_BT = (jax.random.uniform(k[4], (b, t)) > 0.15).astype(jnp.float32)
    return x_IBTD, w_DU, tokens_BT, segment_ids_BT, weights_BT


# Over B=2 rows: T=16 in 4 chunks of 4; T=13 in 4 chunks of 4, padded to 16.
@pytest.mark.parametrize("t, chunk_tokens", [(16, 8), (13, 8)])
def test_chunked_mtp_loss_matches_plain(t, chunk_tokens):
    x, w, tokens, seg, wt = _mtp_inputs(3, 2, 2, t, 24, 48)

    def plain(x_IBTD, w_DU):
        logits_IBTU = jnp.einsum("IBTD,DU->IBTU", x_IBTD, w_DU)
        return losses.mtp_loss(logits_IBTU, tokens, seg, wt)

    def chunked(x_IBTD, w_DU):
        return losses.chunked_mtp_loss(x_IBTD, w_DU, tokens, seg, wt, chunk_tokens=chunk_tokens)

    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(x, w)
    got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(x, w)
    assert float(want[0]) > 0
    # Measured: up to 5e-7.
    assert_close_scaled(got, want, rel=1e-5)
    # Masked positions (past the end, across documents, zero-weight targets) get no gradient.
    _, valid_BT = losses.mtp_targets(tokens, 1, seg, wt)
    assert bool(jnp.all(jnp.where(valid_BT[..., None], 0.0, got[1][0][0]) == 0.0))


def test_chunked_ce_on_a_mesh_matches_one_device():
    """Tokens split over data x fsdp, vocab over tensor, the head's D over fsdp: each device
    chunks its own tokens; value and gradients equal the one-device plain loss."""
    x, w, tg, wt = _inputs(4, 4, 13, 16, 64)  # one row per device: T=13 padded to 15
    want = _value_and_grads(_plain_ce, x, w, tg, wt)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=1, tensor=2))
    with sharding.use_mesh(mesh):
        bt = NamedSharding(mesh, P(("data", "fsdp")))
        x_s = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, None)))
        w_s = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
        tg_s, wt_s = jax.device_put((tg, wt), bt)
        chunked = functools.partial(losses.chunked_cross_entropy, chunk_tokens=5)
        f = jax.jit(jax.value_and_grad(
            lambda x, w, wt: chunked(x, w, tg_s, wt), argnums=(0, 1, 2), has_aux=True))
        got = f(x_s, w_s, wt_s)
        hlo = f.lower(x_s, w_s, wt_s).compile().as_text()
    assert_close_scaled(jax.device_get(got), want, rel=1e-5)  # measured: 2.4e-7
    # The head gradient leaves the loss reduce-scattered to the head's own sharding once
    # ([D / fsdp, U / tensor] = [8, 32]), not reduced once per chunk.
    assert hlo.count("f32[8,32]{1,0} reduce-scatter(") == 1


def test_chunked_loss_never_holds_whole_logits():
    """fwd + bwd at 4096 tokens x 32768 vocab: the plain loss's temporaries exceed one whole
    [tokens, vocab] f32 logits array (512 MiB), the chunked loss's stay below it."""
    b, t, d, u = 4, 1024, 256, 32768
    logits_bytes = b * t * u * 4
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, u), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))

    def temp_bytes(loss_fn):
        def f(x, w, tg, wt):
            return jax.grad(lambda x, w: loss_fn(x, w, tg, wt)[0], argnums=(0, 1))(x, w)
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(_plain_ce)
    chunked = temp_bytes(functools.partial(losses.chunked_cross_entropy, chunk_tokens=512))
    assert plain > logits_bytes, plain
    # A [512, 32768] f32 chunk is 64 MiB; the f32 head gradient 32 MiB.
    assert chunked < logits_bytes / 2, chunked


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CHUNK = 40  # at most 5 positions of the 8 rows per chunk: 8 chunks of 4


@functools.cache
def _micro_setup():
    config = micro_config()
    cfg = config_lib.validate(config)
    graphdef, _, _ = step_lib.abstract_model(cfg)
    params, extra = jax.jit(lambda: nnx.split(
        DeepSeekModel(cfg, rngs=nnx.Rngs(params=0)), nnx.Param, ...)[1:])()
    k = jax.random.split(jax.random.key(5), 3)
    b, t = 8, 32
    tokens = jax.random.randint(k[0], (b, t + 1), 0, cfg.vocab_size)
    cut = jax.random.randint(k[1], (b, 1), 4, t - 4)
    seg = (jnp.arange(t)[None, :] >= cut).astype(jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "segment_ids": seg,
             "weights": (jax.random.uniform(k[2], (b, t)) > 0.1).astype(jnp.float32)}
    return cfg, graphdef, params, extra, batch


@functools.cache
def _micro_grads(chunk: int):
    cfg, graphdef, params, extra, batch = _micro_setup()
    f = jax.jit(functools.partial(step_lib._grads_and_aux, graphdef=graphdef, cfg=cfg,
                                  step_cfg=step_lib.StepConfig(loss_chunk_tokens=chunk)),
                compiler_options=FAST_COMPILE)
    loss, aux, grads = jax.device_get(f(params, extra, batch))
    return dict(loss=loss, ce_sum=aux["ce_sum"], weight_sum=aux["weight_sum"],
                mtp_loss=aux["mtp_loss"], aux_loss=aux["aux_loss"],
                grads=ckpt_lib.flatten_state(grads))


def test_train_step_loss_and_gradients_chunked_equal_plain():
    """The micro model (MoE, MTP, packed documents, zero weights): the step's loss, its parts
    and every parameter's gradient with loss_chunk_tokens=40 equal those with 0."""
    plain, chunked = _micro_grads(0), _micro_grads(CHUNK)
    assert float(plain["mtp_loss"]) > 0 and float(plain["ce_sum"]) > 0
    # Measured: up to 5e-7 of a leaf's largest entry (float32 sums in another order).
    assert_close_scaled(chunked, plain, rel=1e-5)


def test_eval_step_and_model_without_logits():
    cfg, graphdef, params, extra, batch = _micro_setup()
    ev = jax.jit(functools.partial(step_lib.eval_step, graphdef=graphdef,
                                   loss_chunk_tokens=CHUNK), compiler_options=FAST_COMPILE)
    got = ev({"params": params, "extra": extra}, batch)
    plain = _micro_grads(0)
    assert_close_scaled((got["ce_sum"], got["weight_sum"]),
                        (plain["ce_sum"], plain["weight_sum"]), rel=1e-6)  # measured: 1e-7

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def heads(params, extra, tokens_BT):
        model = nnx.merge(graphdef, params, extra)
        full, bare = model(tokens_BT), model(tokens_BT, logits=False)
        w_DU = model.head_weight()
        head = lambda x: jnp.einsum("...D,DU->...U", x, w_DU)  # noqa: E731
        return ((bare.logits, bare.mtp_logits), (head(bare.normed_hidden), full.logits),
                (head(bare.mtp_normed_hidden), full.mtp_logits))

    nothing, main, mtp = heads(params, extra, batch["inputs"])
    assert nothing == (None, None)
    assert_close_scaled(main[0], main[1], rel=1e-6)
    assert_close_scaled(mtp[0], mtp[1], rel=1e-6)


# (A float or a string is refused by ml_collections itself, an int field keeping its type.)
@pytest.mark.parametrize("value", [-1, True])
def test_bad_loss_chunk_tokens_names_the_field(value):
    config = micro_config()
    config.train.loss_chunk_tokens = value
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens"):
        config_lib.validate(config)
