"""Decode benchmarks: the latent cache's size (exact), absorbed vs naive decode step time (CPU,
side by side), and the FP8 cache's logit error.

    python bench/decode.py                      # all four parts
    python bench/decode.py --parts=a --lengths=512,2048

(a) Cache bytes per token per layer for the published V2-Lite / V2 / V3 configs, counted from
    the shapes `init_cache` allocates in bf16 and with fp8=True (via jax.eval_shape) and checked
    against the formula; plus whole-model bytes per token against DeepSeek 67B, the V2 paper's
    baseline.
(b) One decode step (B = 1, T = 1) of a one-layer model with DeepSeek's attention dims
    (C = 512, R = 64, H = V = 128, N = 8 heads, float32) at cache lengths 512 .. 16K, naive
    (decompress K and V from the whole latent cache every step) and absorbed (attention over
    the latent) interleaved in one process; median of --repeats after a compile run.
(c) Teacher-forced decoding with float32, bfloat16 and FP8 latent caches on the same model:
    logit error against the float32 cache.
(d) Absorbed decode step of 1, 2 and 4 layers at one cache length (the model as `generate`
    runs it, `unstacked`): time per step over the 1-layer time should grow like the layer
    count (each layer's cache and weights read in place, nothing copied per step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mla_moe import fp8_cache  # noqa: E402
from mla_moe.cache import init_cache  # noqa: E402
from mla_moe.config import ModelConfig  # noqa: E402
from mla_moe.decoder import DeepSeekModel  # noqa: E402
from mla_moe.generation import decode_step, pad_prompts, prefill  # noqa: E402

# DeepSeek LLM 67B (the V2 paper's dense baseline; DeepSeek LLM paper, Table 2): 95 layers,
# GQA with 8 KV heads of dim 128, bf16 cache.
BASE67_LAYERS, BASE67_KV_HEADS, BASE67_HEAD_DIM = 95, 8, 128
PAPER_BITS_PER_ELEMENT = 6  # V2 deploys its KV cache at ~6 bits per element [P2 p.16]


def _published(name: str) -> ModelConfig:
    import importlib

    cfg = importlib.import_module(f"configs.{name}").get_config()
    return ModelConfig(**cfg.model.to_dict())


def _allocated_per_token_layer(cache, config: ModelConfig, batch: int, slots: int) -> float:
    total = sum(x.size * x.dtype.itemsize for x in cache.latents)
    return total / (config.num_hidden_layers * batch * slots)


def part_a() -> list[str]:
    rows = []
    hdr = (f"{'config':8} {'L':>3} {'N':>4} | {'MLA bf16':>8} {'MLA fp8':>8} "
           f"{'MHA-form':>9} {'paper MHA':>9} | {'MHA/MLA':>7} {'MHA/fp8':>7} | "
           f"{'model KB/token bf16':>19}")
    rows.append(hdr)
    for name, label in (("deepseek_v2_lite", "V2-Lite"), ("deepseek_v2", "V2"),
                        ("deepseek_v3", "V3")):
        c = _published(name)
        n, layers = c.num_attention_heads, c.num_hidden_layers
        mla_bf16 = (c.kv_lora_rank + c.qk_rope_head_dim) * 2
        mla_fp8 = fp8_cache.packed_width(c.kv_lora_rank, c.qk_rope_head_dim)
        # The MHA form of the same attention (what naive MLA would cache): per head a key
        # [k_nope; k_pe] (H + R) and a value (V), bf16.
        mha_form = n * (c.qk_head_dim + c.v_head_dim) * 2
        # The V2 paper's Table 1 MHA row, 2 n_h d_h with d_h = 128.
        paper_mha = 2 * n * c.v_head_dim * 2
        got_bf16 = _allocated_per_token_layer(
            jax.eval_shape(lambda c=c: init_cache(c, 2, 8, "bfloat16")), c, 2, 8)
        got_fp8 = _allocated_per_token_layer(
            jax.eval_shape(lambda c=c: init_cache(c, 2, 8, fp8=True)), c, 2, 8)
        assert got_bf16 == mla_bf16 == 1152, (label, got_bf16, mla_bf16)
        assert got_fp8 == mla_fp8 == 656, (label, got_fp8, mla_fp8)
        rows.append(
            f"{label:8} {layers:>3} {n:>4} | {mla_bf16:>8} {mla_fp8:>8} {mha_form:>9} "
            f"{paper_mha:>9} | {mha_form / mla_bf16:>6.1f}x {mha_form / mla_fp8:>6.1f}x | "
            f"{layers * mla_bf16 / 1000:>19.1f}"
        )
    rows.append("(bytes per token per layer; allocated caches checked equal to the formula)")
    # The paper's 93.3%: V2's whole-model cache per token against DeepSeek 67B's.
    v2 = _published("deepseek_v2")
    elems_v2 = (v2.kv_lora_rank + v2.qk_rope_head_dim) * v2.num_hidden_layers
    base_bytes = 2 * BASE67_KV_HEADS * BASE67_HEAD_DIM * BASE67_LAYERS * 2
    rows.append(f"V2 vs DeepSeek 67B (GQA 8x128, 95 layers, bf16: {base_bytes:,} B/token):")
    for what, nbytes in (
        ("MLA bf16", elems_v2 * 2),
        ("MLA fp8 (ours, 656 B/layer)", v2.num_hidden_layers * 656),
        (f"MLA at {PAPER_BITS_PER_ELEMENT} bits/element (paper's deployment)",
         elems_v2 * PAPER_BITS_PER_ELEMENT / 8),
    ):
        rows.append(f"  {what:45} {nbytes:>9,.0f} B/token  "
                    f"reduction {1 - nbytes / base_bytes:6.1%}")
    return rows


def _bench_model(layers: int = 1, unstacked: bool = True) -> DeepSeekModel:
    config = ModelConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=None, first_k_dense_replace=layers,
        max_position_embeddings=32768, initializer_range=0.05, dtype="float32",
        param_dtype="float32",
    )
    model = DeepSeekModel(config, rngs=nnx.Rngs(0))
    return model.unstacked() if unstacked else model  # `generate` runs it unstacked


def _step_timer(layers: int, length: int, form: str, unstacked: bool = True):
    """A function timing one decode step (B = 1) on a full cache of fresh random latents
    (the new token goes to the last slot), compiled."""
    model = _bench_model(layers, unstacked)
    graphdef, state = nnx.split(model)
    cache = init_cache(model.config, 1, length)
    cache = cache.replace(
        latents=tuple(jax.random.normal(jax.random.key(i), x.shape, x.dtype)
                      for i, x in enumerate(cache.latents)),
        lengths_B=jnp.full((1,), length - 1, jnp.int32))
    tok = jnp.zeros((1, 1), jnp.int32)
    box = [cache]

    def once():
        start = time.perf_counter()
        logits, _, box[0] = decode_step(graphdef, state, tok, box[0], form)
        jax.block_until_ready(logits)
        box[0] = box[0].replace(lengths_B=jnp.full((1,), length - 1, jnp.int32))
        return time.perf_counter() - start

    once()  # compile
    return once


def part_b(lengths: list[int], repeats: int) -> list[str]:
    config = _bench_model().config
    rows = [f"{'cache len':>9} | {'naive ms':>9} {'absorbed ms':>11} | {'speedup':>7} "
            f"{'gap ms':>8} | {'min-time speedup':>16}"]
    for s in lengths:
        timers = {form: _step_timer(1, s, form) for form in ("naive", "absorbed")}
        times = {form: [] for form in timers}
        for _ in range(repeats):
            for form, once in timers.items():
                times[form].append(once())
        naive, absorbed = (float(np.median(times[f])) * 1e3 for f in ("naive", "absorbed"))
        best = min(times["naive"]) / min(times["absorbed"])
        rows.append(f"{s:>9} | {naive:>9.2f} {absorbed:>11.2f} | {naive / absorbed:>6.2f}x "
                    f"{naive - absorbed:>8.1f} | {best:>15.2f}x")
        print(rows[-1], flush=True)
    rows.append(f"(one decode step, B=1, 1 layer, N={config.num_attention_heads}, C=512, R=64, "
                f"H=V=128, float32, median of {repeats}; target: absorbed wins from 2K, "
                "gap widens)")
    return rows


def part_d(length: int, repeats: int) -> list[str]:
    timers = {(n, u): _step_timer(n, length, "absorbed", u) for n in (1, 2, 4)
              for u in (True, False)}
    times = {k: [] for k in timers}
    for _ in range(repeats):
        for k, once in timers.items():
            once()  # a step right before, as in a decode loop (warm caches)
            times[k].append(once())
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med[(1, True)]
    rows = [f"{'layers':>6} | {'unstacked ms':>12} {'/ 1 layer':>9} | {'stacked ms':>10} | "
            f"{'stacked/unstacked':>17} | target"]
    for n in (1, 2, 4):
        t, st = med[(n, True)], med[(n, False)]
        rows.append(f"{n:>6} | {t * 1e3:>12.2f} {t / base:>8.2f}x | {st * 1e3:>10.2f} | "
                    f"{st / t:>16.2f}x | ~{n}x")
    rows.append(f"(cache length {length}, B=1, dims as in (b), median of {repeats}, interleaved; "
                "stacked: the layer-group weights sliced out in every step)")
    return rows


def part_c(steps: int = 32, prompt_len: int = 256) -> list[str]:
    model = _bench_model()
    config = model.config
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, prompt_len).tolist() for _ in range(2)]
    tokens_BT, lengths_B = pad_prompts(prompts, config.vocab_size, prompt_len)
    forced = jax.random.randint(jax.random.key(1), (steps, 2, 1), 0, config.vocab_size)
    slots = prompt_len + steps
    logits = {}
    for name, cache in (("f32", init_cache(config, 2, slots, "float32")),
                        ("bf16", init_cache(config, 2, slots, "bfloat16")),
                        ("fp8", init_cache(config, 2, slots, fp8=True))):
        h_BD, _, cache = prefill(model, tokens_BT, lengths_B, cache, chunk=128)
        out = [model.logits(h_BD[:, None])]
        for tok in forced:
            lg, _, cache = decode_step(graphdef, state, tok, cache)
            out.append(lg)
        logits[name] = jnp.concatenate(out, axis=1)
    ref = logits["f32"]
    spread = float(ref.std())
    rows = [f"{'cache':>5} | {'max|dlogit|':>11} {'rms dlogit':>10} {'/ logit std':>11} | "
            f"{'top-1 agree':>11}"]
    for name in ("bf16", "fp8"):
        d = logits[name] - ref
        agree = float(jnp.mean(jnp.argmax(logits[name], -1) == jnp.argmax(ref, -1)))
        rms = float(jnp.sqrt(jnp.mean(d * d)))
        rows.append(f"{name:>5} | {float(jnp.abs(d).max()):>11.2e} {rms:>10.2e} "
                    f"{rms / spread:>11.2e} | {agree:>11.1%}")
    rows.append(f"(vs the float32 cache; 1-layer C=512 model, {prompt_len}-token prompts, "
                f"{steps} teacher-forced steps, logit std {spread:.3f})")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="abcd")
    parser.add_argument("--layers_length", type=int, default=4096)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    tables = []
    if "a" in args.parts:
        tables.append(("(a) decode cache size", part_a()))
    if "b" in args.parts:
        lengths = [int(x) for x in args.lengths.split(",")]
        tables.append(("(b) absorbed vs naive decode step, CPU", part_b(lengths, args.repeats)))
    if "c" in args.parts:
        tables.append(("(c) FP8 vs bf16 latent cache: logit error", part_c()))
    if "d" in args.parts:
        tables.append(("(d) absorbed decode step vs layer count, CPU",
                       part_d(args.layers_length, args.repeats)))
    print(f"\njax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs")
    for title, rows in tables:
        print(f"\n{title}")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
