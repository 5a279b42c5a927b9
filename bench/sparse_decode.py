"""Sparse (DeepSeek-V3.2) vs dense absorbed decode, kernel level, XLA on CPU.

    python bench/sparse_decode.py                       # N = 128 heads, 32K and 128K slots
    python bench/sparse_decode.py --heads=16 --repeats=9

One decode step (B = 1, T = 1) with DeepSeek's latent dims (C = 512, R = 64), float32 by
default: `latent_attention_cache(implementation="xla")` over the whole cache (the dense
absorbed path) against `sparse_latent_attention_cache(implementation="xla")` over K = 2048
distinct slots drawn at random (the blocked reference the XLA path runs). Both are compiled
first, then timed interleaved in one process; median of --repeats each, and the ratio.

Then the cache bytes per token per layer (exact, from the dims) and the cache bytes one query
reads: dense reads every slot, sparse K rows (on TPU each row moves with its pair neighbour in
the kernel's cache layout, 640 lanes wide).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import latent_attention_cache, sparse_latent_attention_cache  # noqa: E402

C, R = 512, 64
INDEX_HEAD_DIM = 128  # V3.2's indexer key per token per layer (index_head_dim)
SM_SCALE = 0.1


def _inputs(heads: int, slots: int, k: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    q_latent = jnp.asarray(rng.standard_normal((1, 1, heads, C)), dtype)
    q_pe = jnp.asarray(rng.standard_normal((1, 1, heads, R)), dtype)
    cache = jnp.asarray(rng.standard_normal((1, slots, C + R)), dtype)
    indices = jnp.asarray(rng.choice(slots, size=(1, 1, k), replace=False), jnp.int32)
    return q_latent, q_pe, cache, indices


def _timers(heads: int, slots: int, k: int, dtype):
    q_latent, q_pe, cache, indices = _inputs(heads, slots, k, dtype)
    lengths = jnp.full((1,), slots, jnp.int32)
    dense = jax.jit(lambda q, qp, kv, n: latent_attention_cache(
        q, qp, kv, lengths_B=n, sm_scale=SM_SCALE, implementation="xla"))
    sparse = jax.jit(lambda q, qp, kv, i: sparse_latent_attention_cache(
        q, qp, kv, i, sm_scale=SM_SCALE, implementation="xla"))
    calls = {"dense": lambda: dense(q_latent, q_pe, cache, lengths),
             "sparse": lambda: sparse(q_latent, q_pe, cache, indices)}
    for call in calls.values():
        jax.block_until_ready(call())  # compile

    def once(name):
        start = time.perf_counter()
        jax.block_until_ready(calls[name]())
        return time.perf_counter() - start

    return once


def time_table(heads: int, lengths: list[int], k: int, repeats: int, dtype) -> list[str]:
    rows = [f"{'slots':>7} {'K':>5} | {'dense ms':>9} {'sparse ms':>9} | {'dense/sparse':>12}"]
    for slots in lengths:
        once = _timers(heads, slots, k, dtype)
        times = {"dense": [], "sparse": []}
        for _ in range(repeats):
            for name in times:
                times[name].append(once(name))
        dense, sparse = (float(np.median(times[n])) * 1e3 for n in ("dense", "sparse"))
        rows.append(f"{slots:>7} {k:>5} | {dense:>9.2f} {sparse:>9.2f} | {dense / sparse:>12.1f}")
    rows.append(f"(B=1, T=1, N={heads}, C={C}, R={R}, {jnp.dtype(dtype).name}, XLA on "
                f"{jax.devices()[0].platform.upper()}, median of {repeats}, interleaved)")
    return rows


def bytes_table(lengths: list[int], k: int) -> list[str]:
    latent = (C + R) * 2  # bf16
    tpu_row = -(-(C + R) // 128) * 128 * 2  # the kernel's TPU layout: lanes padded to 128
    rows = ["cache bytes per token per layer (bf16): latent "
            f"{latent}, indexer key {INDEX_HEAD_DIM * 2}, V3.2 total {latent + INDEX_HEAD_DIM * 2}"
            f"; in the TPU kernel's layout the latent takes {tpu_row}",
            f"{'slots':>7} | {'dense MB read':>13} {'sparse MB (GPU)':>15} "
            f"{'sparse MB (TPU)':>15} | {'dense/sparse GPU':>16} {'TPU':>5}"]
    for slots in lengths:
        dense, gpu, tpu = slots * latent, k * latent, k * 2 * tpu_row
        rows.append(f"{slots:>7} | {dense / 1e6:>13.1f} {gpu / 1e6:>15.2f} {tpu / 1e6:>15.2f} | "
                    f"{dense / gpu:>16.0f} {dense / tpu:>5.0f}")
    rows.append(f"(cache bytes one query reads, K={k}; the TPU kernel moves each selected row "
                "with its pair neighbour)")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    for line in time_table(args.heads, lengths, args.topk, args.repeats, args.dtype):
        print(line)
    print()
    for line in bytes_table(lengths, args.topk):
        print(line)


if __name__ == "__main__":
    main()
