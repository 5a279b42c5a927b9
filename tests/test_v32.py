"""DeepSeek-V3.2 (DeepSeek Sparse Attention): the lightning indexer against transformers'
`deepseek_v32`, its cache, its checkpoints, and its training losses.

The logits, save/load and bf16 parity of the V3.2 model run with the other HF models in
test_hf_parity.py, and greedy generation in test_generate_hf.py (config "v32" of hf_models.py:
24 tokens with index_topk=8, so attention is sparse)."""

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import HF_CONFIGS, hf_logits, make_hf_model
from tolerance import assert_close_scaled

from mla_moe import DeepSeekModel, ModelConfig, dsa_loss, fp8_cache, init_cache, param_count
from mla_moe import attention as attn
from mla_moe import indexer as dsa
from mla_moe.cache import IndexKeyCodec
from mla_moe.hf import load_pretrained
from mla_moe.train import config as config_lib
from mla_moe.train import optimizer as optimizer_lib

# Logits against transformers / across cache paths, relative to the largest |logit|
# (measured: 6e-7 against transformers, 1e-6 between the cached and uncached paths).
TOL = 2e-5


@functools.partial(jax.jit, static_argnames=("graphdef", "form"))
def _jit_forward(graphdef, state, tokens_BT, cache=None, form=None):
    out = nnx.merge(graphdef, state)(tokens_BT, cache=cache, attention_form=form)
    return out.logits, out.cache


def _forward(model, tokens_BT, cache=None, form=None):
    """(logits, the updated cache) of `model`, compiled (eager runs are slow on CPU)."""
    return _jit_forward(*nnx.split(model), jnp.asarray(tokens_BT), cache, form)


def _tokens(seed, shape=(2, 24)):
    return np.random.default_rng(seed).integers(0, 97, shape)


@pytest.fixture(scope="module")
def hf_v32(tmp_path_factory):
    model = make_hf_model("v32")
    path = tmp_path_factory.mktemp("v32")
    model.save_pretrained(path)
    return model, path, load_pretrained(path)


def _config(**changes):
    return ModelConfig.from_hf(HF_CONFIGS["v32"][1] | {"model_type": "deepseek_v32"}, **changes)


# --- config ------------------------------------------------------------------------------------
def test_config_round_trips_through_hf():
    cfg = _config()
    assert cfg.has_indexer and (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (8, 16, 8)
    hf = cfg.to_hf()
    assert hf["model_type"] == "deepseek_v32"
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"]
    assert ModelConfig.from_hf(hf) == cfg
    # A V3.2 config.json without the indexer fields gets transformers' defaults.
    bare = {k: v for k, v in hf.items() if not k.startswith("index_")}
    assert ModelConfig.from_hf(bare).index_topk == 2048
    assert ModelConfig.from_hf(bare).index_n_heads == 64


@pytest.mark.parametrize("changes, field", [
    (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(index_head_dim=4), "index_head_dim"),
    (dict(index_topk=0), "index_topk"),
    (dict(index_n_heads=-1), "index_n_heads"),
    (dict(index_attention="full"), "index_attention"),
])
def test_bad_indexer_fields_are_named(changes, field):
    with pytest.raises(ValueError, match=field):
        _config(**changes)


def test_preset_parameter_count():
    v32 = config_lib.model_config(importlib.import_module("configs.deepseek_v32").get_config())
    v3 = config_lib.model_config(importlib.import_module("configs.deepseek_v3").get_config())
    assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64  # wq_b, wk, k_norm, w
    assert per_layer == 13_959_424  # the published 13.96M
    total, active = param_count(v32)
    assert total - param_count(v3)[0] == 61 * per_layer  # ~0.85B
    assert active - param_count(v3)[1] == 61 * per_layer
    assert abs(total - 671.9e9) < 0.1e9


def test_training_stage_needs_an_indexer():
    cfg = importlib.import_module("configs.deepseek_v3").get_config("runlocal")
    cfg.train.dsa_stage = "warmup"
    with pytest.raises(config_lib.ConfigError, match="train.dsa_stage"):
        config_lib.validate(cfg)
    v32 = importlib.import_module("configs.deepseek_v32").get_config("runlocal_warmup")
    assert config_lib.model_config(v32).index_attention == "dense"
    assert config_lib.validate(v32).has_indexer


# --- the indexer against transformers --------------------------------------------------------
def _sets(idx_BTK, visible_BTS):
    """Each row's selected visible keys as a frozenset."""
    out = []
    for b in range(idx_BTK.shape[0]):
        for t in range(idx_BTK.shape[1]):
            out.append(frozenset(int(s) for s in idx_BTK[b, t] if s >= 0 and visible_BTS[b, t, s]))
    return out


def test_selected_index_sets_match_transformers(hf_v32):
    import torch

    hf, _, ours = hf_v32
    captured = []

    def hook(module, args, kwargs, output):
        x, q_resid = kwargs.get("hidden_states", args[0] if args else None), kwargs.get(
            "q_resid", args[1] if len(args) > 1 else None)
        captured.append((x.detach().numpy(), q_resid.detach().numpy(), output.numpy()))

    handles = [layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True)
               for layer in hf.model.layers]
    tokens = _tokens(5)
    with torch.no_grad():
        hf(input_ids=torch.as_tensor(tokens))
    for h in handles:
        h.remove()
    layers = [layer for group in ours.unstacked().groups for layer in group]
    assert len(captured) == len(layers) == 3
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    visible = np.asarray(attn.causal_segment_mask(None, b, t))
    sparse_rows = 0
    for (x, q_resid, want_idx), layer in zip(captured, layers, strict=True):
        ix = layer.attn.indexer
        scores = dsa.index_scores(ix.queries(jnp.asarray(q_resid), positions),
                                  ix.weights(jnp.asarray(x)), ix.keys(jnp.asarray(x), positions))
        got_idx = np.asarray(dsa.top_k(scores, jnp.asarray(visible), ours.config.index_topk))
        assert _sets(got_idx, visible) == _sets(want_idx, visible)
        sparse_rows += sum(len(s) == 8 for s in _sets(got_idx, visible)[8:])
    assert sparse_rows > 0  # rows with more visible keys than top-k: a real selection


def test_up_to_index_topk_tokens_is_dense_v3_exactly(hf_v32):
    _, _, ours = hf_v32
    graphdef, state = nnx.split(ours)
    v3 = DeepSeekModel(ours.config.replace(index_n_heads=0), rngs=nnx.Rngs(0))
    v3_state = nnx.state(v3)
    flat = {k: v for k, v in nnx.to_flat_state(state) if "indexer" not in k}
    nnx.update(v3, nnx.from_flat_state([(k, flat[k]) for k, _ in nnx.to_flat_state(v3_state)]))
    tokens = _tokens(6, (2, ours.config.index_topk))
    np.testing.assert_array_equal(np.asarray(_forward(ours, tokens)[0]),
                                  np.asarray(_forward(v3, tokens)[0]))
    # More tokens than index_topk and the selection bites: the two models differ.
    tokens = _tokens(6, (2, 3 * ours.config.index_topk))
    assert not np.allclose(np.asarray(_forward(ours, tokens)[0]),
                           np.asarray(_forward(v3, tokens)[0]))


# --- the cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_prefill_decode_and_chunked_prefill_match_the_full_forward(hf_v32, form):
    hf, _, ours = hf_v32
    model = ours.unstacked()
    tokens = _tokens(7)
    full = np.asarray(_forward(model, tokens)[0])
    assert_close_scaled(full, hf_logits(hf, tokens), rel=TOL)
    b, t = tokens.shape
    for chunks in ([10, 1, 1, 12], [8, 8, 8]):  # prefill + decode steps; chunked prefill
        cache = init_cache(model.config, b, 32)
        assert len(cache.index_keys) == model.config.num_hidden_layers
        got, start = [], 0
        for n in chunks:
            logits, cache = _forward(model, tokens[:, start:start + n], cache, form)
            start += n
            got.append(np.asarray(logits))
        assert_close_scaled(np.concatenate(got, axis=1), full, rel=TOL, err_msg=str(chunks))
        assert int(cache.lengths_B[0]) == t


def test_decode_on_the_sparse_kernel_matches_the_xla_path(hf_v32):
    """attention_impl="interpret": the absorbed decode runs pallas_kernels'
    sparse_latent_attention_cache (interpret mode) over the indexer's top-k slots."""
    _, _, ours = hf_v32
    kernel_model = DeepSeekModel(ours.config.replace(attention_impl="interpret"),
                                 rngs=nnx.Rngs(0))
    nnx.update(kernel_model, nnx.state(ours))
    tokens = _tokens(10, (2, 20))
    logits = []
    for model in (ours.unstacked(), kernel_model.unstacked()):
        cache = init_cache(model.config, 2, 32)
        _, cache = _forward(model, tokens[:, :12], cache, "naive")  # prefill: the same path
        steps = []
        for i in range(12, 20):  # decode steps over 12..19 slots, past top-8
            lg, cache = _forward(model, tokens[:, i:i + 1], cache, "absorbed")
            steps.append(np.asarray(lg))
        logits.append(np.concatenate(steps, axis=1))
    assert_close_scaled(logits[1], logits[0], rel=TOL)


def test_fp8_index_key_cache():
    k = jax.random.normal(jax.random.key(0), (2, 5, 200)) * jnp.array([0.01, 30.0])[:, None, None]
    packed = fp8_cache.pack_key(k)
    assert packed.dtype == jnp.uint8 and packed.shape[-1] == 200 + 4 * 2
    back = fp8_cache.unpack_key(packed)
    scales = np.asarray(fp8_cache._from_bytes(packed[..., 200:], jnp.float32))
    assert np.all(np.log2(scales) == np.round(np.log2(scales)))  # powers of two (ue8m0)
    for row in range(2):  # e4m3 keeps 3 mantissa bits: within 1/16 of each block's max
        assert_close_scaled(back[row], k[row], rel=1 / 16)
    codec = IndexKeyCodec.of(jnp.zeros((1, 1, 208), jnp.uint8), jnp.float32)
    np.testing.assert_array_equal(codec.read(codec.write(k)), back)


def test_cache_bytes_per_token_at_v32_size():
    cfg = config_lib.model_config(importlib.import_module("configs.deepseek_v32").get_config())
    bf16 = jax.eval_shape(lambda: init_cache(cfg, 1, 16))
    fp8 = jax.eval_shape(lambda: init_cache(cfg, 1, 16, fp8=True))

    def per_token(cache):
        return sum(x.shape[-1] * x.dtype.itemsize for x in (cache.latents[0], cache.index_keys[0]))

    assert per_token(bf16) == 1152 + 256
    assert per_token(fp8) == 656 + 132


def test_fp8_cache_decodes_close_to_the_float_cache(hf_v32):
    """Teacher-forced steps over float32, bfloat16 and FP8 caches (latents and indexer keys)
    of the sparse model: the FP8 error is larger than bfloat16's but bounded (the indexer's
    share of it is bounded per logit in the test below)."""
    _, _, ours = hf_v32
    model = ours.unstacked()
    tokens = _tokens(8, (2, 24))
    outs = {}
    for name, kw in (("f32", dict(dtype="float32")), ("bf16", dict(dtype="bfloat16")),
                     ("fp8", dict(fp8=True))):
        cache = init_cache(model.config, 2, 32, **kw)
        assert (cache.index_keys[0].dtype == jnp.uint8) == (name == "fp8")
        _, cache = _forward(model, tokens[:, :12], cache)
        outs[name] = np.asarray(_forward(model, tokens[:, 12:], cache)[0])  # 12 of 24 > top-8
    # A key near the top-k cutoff may flip in or out of the selection under bf16 or FP8
    # rounding, which moves that token's logits by O(spread): bound the typical error, not the
    # worst token. Measured: median |error| bf16 1.4e-3, fp8 4.6e-2 at logit std 0.5.
    med = {k: float(np.median(np.abs(v - outs["f32"]))) for k, v in outs.items()}
    assert 0 < med["bf16"] < med["fp8"] < 0.25 * outs["f32"].std(), med


def _e4m3_logit_bound(q_BTHI, w_BTH, k_BSI):
    """A bound on |I_fp8 - I| per logit [B, T, S] when the keys are stored as e4m3 with one
    power-of-two scale per 128 values (the smallest >= max|block| / 448) and read back.

    Each stored key value is within 2^-4 |k_j| of k_j (3 mantissa bits, rounding to nearest),
    or within 2^-10 of its scale where the scaled value is subnormal (below 2^-6, spacing
    2^-9). So head h's dot a = q . k / sqrt(Di) moves by at most
    d = sum_j |q_j| (2^-4 |k_j| + 2^-10 scale_j) / sqrt(Di), its relu by at most
    clip(a + d, 0, d) (0 where a + d <= 0: both sides are cut off), and the logit by the sum
    of those times |w_h|; plus float32 rounding of both computations (Di + Hi terms)."""
    q, w, k = (np.asarray(a, np.float64) for a in (q_BTHI, w_BTH, k_BSI))
    di, hi = k.shape[-1], w.shape[-1]
    z = -(-di // 128)
    blocks = np.pad(np.abs(k), [(0, 0), (0, 0), (0, 128 * z - di)]).reshape(*k.shape[:2], z, 128)
    scale_BSZ = 2.0 ** np.ceil(np.log2(blocks.max(-1) / 448))
    err_BSI = 2.0**-4 * np.abs(k) + 2.0**-10 * np.repeat(scale_BSZ, 128, axis=-1)[..., :di]
    a_BTHS = np.einsum("BTHI,BSI->BTHS", q, k) / np.sqrt(di)
    d_BTHS = np.einsum("BTHI,BSI->BTHS", np.abs(q), err_BSI) / np.sqrt(di)
    size_BTHS = np.einsum("BTHI,BSI->BTHS", np.abs(q), np.abs(k)) / np.sqrt(di)
    per_head_BTHS = np.clip(a_BTHS + d_BTHS, 0, d_BTHS) + (di + hi) * 2.0**-23 * size_BTHS
    return np.einsum("BTH,BTHS->BTS", np.abs(w), per_head_BTHS)


def test_fp8_index_keys_move_the_indexer_logits_within_the_e4m3_bound(hf_v32):
    """The indexer's logits over keys written to and read from an FP8 key cache, against the
    float32 keys: every logit within `_e4m3_logit_bound`, and every row whose reference top-k
    margin (k-th minus (k+1)-th visible logit) exceeds twice the row's largest bound selects
    the same keys (no logit can cross the cutoff).

    The random model's queries hardly prefer any key: their margins sit below the bound. So
    each sequence repeats one key K times among its first 2K tokens (a repeated token), and
    each later query looks for it with a strength u uniform in [0, 2) (u |q| along the key,
    against the sign of heads of negative weight): rows from no preference to a clear one."""
    _, _, ours = hf_v32
    model = ours.unstacked()
    cfg = model.config
    b, t, k = 4, 48, cfg.index_topk
    codec = IndexKeyCodec.of(init_cache(cfg, b, t, fp8=True).index_keys[0], jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    visible = np.asarray(attn.causal_segment_mask(None, b, t))
    rng = np.random.default_rng(0)
    checked = 0
    for i, layer in enumerate(layer for group in model.groups for layer in group):
        mla, ix = layer.attn, layer.attn.indexer
        x = jax.random.normal(jax.random.key(i), (b, t, cfg.hidden_size))
        q = np.array(ix.queries(mla.query_latent(x), positions))
        w, keys = ix.weights(x), np.array(ix.keys(x, positions))
        sign_w = np.sign(np.asarray(w))[..., None]
        for bi in range(b):
            repeats = rng.choice(2 * k, k, replace=False)
            keys[bi, repeats] = keys[bi, repeats[0]]
            unit = keys[bi, repeats[0]] / np.linalg.norm(keys[bi, repeats[0]])
            for ti in range(2 * k, t):
                size = np.linalg.norm(q[bi, ti], axis=-1, keepdims=True)
                q[bi, ti] += rng.uniform(0, 2) * size * sign_w[bi, ti] * unit
        q, keys = jnp.asarray(q), jnp.asarray(keys)
        ref = np.asarray(dsa.index_scores(q, w, keys))
        got = np.asarray(dsa.index_scores(q, w, codec.read(codec.write(keys))))
        bound = _e4m3_logit_bound(q, w, keys)
        err = np.abs(got - ref)
        assert err.max() > 0  # the keys were rounded
        # (measured: the largest error is 0.52 of its bound)
        assert np.all(err <= bound), float(np.max(err / bound))
        idx = (dsa.top_k(jnp.asarray(s), jnp.asarray(visible), k) for s in (ref, got))
        ref_sets, got_sets = (_sets(np.asarray(a), visible) for a in idx)
        # Hidden keys sort last at the lowest finite float (rows with k or fewer visible keys
        # are left out below, and no -inf - -inf is formed for them).
        top = -np.sort(-np.where(visible, ref, np.finfo(np.float32).min), axis=-1)
        margin = top[..., k - 1] - top[..., k]
        beta = np.max(np.where(visible, bound, 0), axis=-1)
        clear = ((margin > 2 * beta) & (visible.sum(-1) > k)).reshape(-1)  # a real top-k
        assert all(ref_sets[r] == got_sets[r] for r in np.flatnonzero(clear))
        checked += int(clear.sum())
    # Measured: 207 clear rows (204 of the 3 x 128 after the repeats); 22 other rows select
    # differently on FP8 keys.
    assert checked >= 0.25 * 3 * b * (t - 2 * k), checked


# --- checkpoints -------------------------------------------------------------------------------
def test_fp8_indexer_weights_are_dequantised(hf_v32, tmp_path):
    import ml_dtypes

    from mla_moe.hf.safetensors_io import SafetensorsFile, write_safetensors

    _, path, _ = hf_v32
    st = SafetensorsFile(str(path / "model.safetensors"))
    tensors, want = {n: np.asarray(st.get(n)) for n in st.names()}, {}
    rng = np.random.default_rng(0)
    for n in list(tensors):
        if n.endswith(("indexer.wq_b.weight", "indexer.wk.weight")):
            w = tensors[n]
            scale = rng.uniform(0.5, 2.0, ((w.shape[0] + 127) // 128, (w.shape[1] + 127) // 128))
            scale = scale.astype(np.float32)
            full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
            q = (w / full).astype(ml_dtypes.float8_e4m3fn)
            tensors[n], tensors[n + "_scale_inv"] = q, scale
            want[n] = q.astype(np.float32) * full
    assert len(want) == 2 * 3
    out = tmp_path / "fp8"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    write_safetensors(str(out / "model.safetensors"),
                      [(n, t.shape, t.dtype) for n, t in tensors.items()], tensors.__getitem__)
    model = load_pretrained(out).unstacked()
    layers = [layer for group in model.groups for layer in group]
    for i, layer in enumerate(layers):
        ix = layer.attn.indexer
        wk = want[f"model.layers.{i}.self_attn.indexer.wk.weight"]
        assert_close_scaled(np.asarray(ix.wk_DI[...]).T, wk, rel=1e-6)
        wq = want[f"model.layers.{i}.self_attn.indexer.wq_b.weight"]
        ours = np.asarray(ix.wq_b_QHI[...])
        assert_close_scaled(ours.transpose(1, 2, 0).reshape(-1, ours.shape[0]), wq, rel=1e-6)
        assert ix.weights_proj_DH[...].dtype == jnp.float32


# --- training losses ---------------------------------------------------------------------------
def _numpy_kl(target, scores, mask):
    out = np.zeros(target.shape[:-1])
    for idx in np.ndindex(*target.shape[:-1]):
        m = mask[idx]
        if not m.any():
            continue
        s = scores[idx][m].astype(np.float64)
        log_q = s - s.max() - np.log(np.exp(s - s.max()).sum())
        p = target[idx][m].astype(np.float64)
        nz = p > 0
        out[idx] = np.sum(p[nz] * (np.log(p[nz]) - log_q[nz]))
    return out


def test_kl_matches_its_definition():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    mask = np.asarray(attn.causal_segment_mask(None, 2, 9)) & np.asarray(
        jax.random.bernoulli(k3, 0.7, (2, 9, 9)))
    mask[:, :, 0] = True
    target = np.where(mask, np.asarray(jax.random.uniform(k1, (2, 9, 9))), 0.0)
    target /= target.sum(-1, keepdims=True)
    scores = np.asarray(jax.random.normal(k2, (2, 9, 9))) * 3
    got = dsa_loss.kl_to_scores(jnp.asarray(target), jnp.asarray(scores), jnp.asarray(mask))
    assert_close_scaled(got, _numpy_kl(target, scores, mask), rel=1e-5)
    assert float(jnp.min(got)) >= -1e-6


def test_attention_target_is_the_head_summed_attention(hf_v32):
    _, _, ours = hf_v32
    attn_layer = ours.unstacked().groups[0][0].attn
    c = ours.config
    x = jax.random.normal(jax.random.key(2), (2, 12, c.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    q_nope, q_pe = attn_layer.queries(x, pos)
    latent = attn_layer.latent(x, pos)
    mask = attn.causal_segment_mask(None, 2, 12)
    q_latent = jnp.einsum("BTNH,CNH->BTNC", q_nope, attn_layer.wk_b_CNH[...])
    from mla_moe.rope import softmax_scale

    p = dsa_loss.attention_target(q_latent, q_pe, latent, mask, softmax_scale(c))
    # The naive form's probabilities, head by head, from per-head keys.
    k_nope = jnp.einsum("BSC,CNH->BSNH", latent[..., : c.kv_lora_rank], attn_layer.wk_b_CNH[...])
    scores = (jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope)
              + jnp.einsum("BTNR,BSR->BNTS", q_pe, latent[..., c.kv_lora_rank:]))
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores * softmax_scale(c), -jnp.inf), -1)
    assert_close_scaled(p, probs.mean(1), rel=1e-5)
    np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_loss_trains_the_indexer_only(hf_v32, stage):
    _, _, ours = hf_v32
    cfg = ours.config.replace(index_attention="dense" if stage == "warmup" else "sparse")
    graphdef, params, extra = nnx.split(ours, nnx.Param, ...)
    graphdef = nnx.graphdef(DeepSeekModel(cfg, rngs=nnx.Rngs(0)))
    tokens = _tokens(9)

    def losses(params):
        out = nnx.merge(graphdef, params, extra)(tokens, indexer_loss=True)
        ce = -jnp.mean(jax.nn.log_softmax(out.logits)[:, :-1].max(-1))
        return out.indexer_loss, ce

    kl_grad = jax.jit(jax.grad(lambda p: losses(p)[0]))(params)
    ce_grad = jax.jit(jax.grad(lambda p: losses(p)[1]))(params)
    kl, _ = jax.jit(losses)(params)
    assert float(kl) > 0
    for path, g in nnx.to_flat_state(kl_grad):
        norm = float(jnp.linalg.norm(g[...]))
        if "indexer" in path:
            assert norm > 0, path  # every indexer weight learns from the KL
        else:
            assert norm == 0, path  # nothing else does (detached inputs and target)
    for path, g in nnx.to_flat_state(ce_grad):  # the LM loss never reaches the indexer
        if "indexer" in path:
            assert float(jnp.linalg.norm(g[...])) == 0, path


def test_warmup_optimizer_updates_only_the_indexers():
    cfg = importlib.import_module("configs.deepseek_v32").get_config("runlocal_warmup")
    cfg.train.warmup_steps = 0  # a non-zero learning rate at step 0
    tx, _ = optimizer_lib.make_optimizer(cfg.train)
    model = DeepSeekModel(config_lib.model_config(cfg), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    moved = {path: float(jnp.abs(u[...]).max()) for path, u in nnx.to_flat_state(updates)}
    assert all((v > 0) == ("indexer" in k) for k, v in moved.items())
    chex.assert_trees_all_equal_structs(updates, params)
