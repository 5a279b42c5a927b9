"""Peak temporary memory of the chunked XLA MLA reference vs the dense oracle, by T = S.

Compile-only (nothing runs): XLA's memory_analysis().temp_size_in_bytes of the jitted forward
and of the gradient of all five inputs, f32, B=1. The chunked reference should grow ~2x per
doubling of the sequence (linear), the dense oracle ~4x ([B, N, T, S] scores).

Second table, V3.2 (DeepSeek Sparse Attention, sparse training stage): the indexer's top-k,
the attention over the selected keys and the indexer's KL, forward and the gradient of their
sum w.r.t. the queries, the latent and the indexer's q, w, k, at a fixed top-k K. Blocked
(dsa_blocked.py) should grow ~2x per doubling of T (K fixed), the dense masked forms
(indexer.py top-k, absorbed attention under a [B, T, S] mask, dsa_loss.py KL) ~4x.

Usage: python bench/attention_memory.py [--heads 2] [--block_kv 256] [--seq_lens 2048 4096 8192]
       [--v32_seq_lens 2048 4096 8192 16384 32768] [--topk 64] [--block_q 64] [--block_k 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mla_moe import attention as attn  # noqa: E402
from mla_moe import dsa_blocked, dsa_loss  # noqa: E402
from mla_moe import indexer as dsa  # noqa: E402
from pallas_kernels import mla_attention_naive, mla_attention_reference  # noqa: E402


def temp_bytes(fn, args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def v32_losses(blocked: bool, topk: int, block_q: int, block_k: int, sm_scale: float = 0.1):
    """sum(o) + mean(KL) of V3.2's sparse training attention on (q_nope, q_pe, kv, w_uk,
    w_uv, iq, iw, ik): the indexer's top-k, the attention over it, the KL over it."""

    def blocked_fn(q_nope, q_pe, kv, w_uk, w_uv, iq, iw, ik):
        idx = dsa_blocked.top_k(iq, iw, ik, None, topk, block_q, block_k)
        o = dsa_blocked.sparse_attention(q_nope, q_pe, kv, w_uk, w_uv, idx, sm_scale, block_q)
        kl = dsa_blocked.sparse_kl(q_nope, q_pe, kv, w_uk, idx, iq, iw, ik, sm_scale, block_q)
        return jnp.sum(o) + jnp.mean(kl)

    def dense_fn(q_nope, q_pe, kv, w_uk, w_uv, iq, iw, ik):
        b, t = kv.shape[:2]
        scores = dsa.index_scores(iq, iw, ik)
        visible = attn.causal_segment_mask(None, b, t)
        mask = visible & dsa.selection_mask(
            dsa.top_k(jax.lax.stop_gradient(scores), visible, topk), t)
        q_latent = jnp.einsum("BTNH,CNH->BTNC", q_nope, w_uk)
        o = jnp.einsum("BTNC,CNV->BTNV", attn.absorbed_attention(
            q_latent, q_pe, [(kv, mask)], sm_scale), w_uv)
        target = dsa_loss.attention_target(q_latent, q_pe, kv, mask, sm_scale)
        return jnp.sum(o) + jnp.mean(dsa_loss.kl_to_scores(target, scores, mask))

    return blocked_fn if blocked else dense_fn


def v32_table(args):
    """The V3.2 rows: temp bytes of blocked vs dense, forward and gradient, by T."""
    n, h, r, c, v, hi, di = args.heads, 16, 8, 32, 16, 4, 16
    rows = []
    for t in args.v32_seq_lens:
        shapes = [(1, t, n, h), (1, t, n, r), (1, t, c + r), (c, n, h), (c, n, v),
                  (1, t, hi, di), (1, t, hi), (1, t, di)]
        inputs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
        row = [t]
        for blocked in (True, False):
            fn = v32_losses(blocked, args.topk, args.block_q, args.block_k)
            row.append(temp_bytes(fn, inputs))
            row.append(temp_bytes(jax.grad(fn, argnums=(0, 1, 2, 5, 6, 7)), inputs))
        rows.append(row)
    print(f"\nV3.2 sparse training attention (top-k + attention + KL), N={n}, C={c}, R={r}, "
          f"indexer {hi}x{di}, K={args.topk}, blocks {args.block_q}x{args.block_k}, f32; "
          f"temp MiB (x growth vs previous row)")
    header = ["T=S", "blocked fwd", "blocked grad", "dense fwd", "dense grad", "dense/blocked"]
    print("".join(f"{x:>20}" for x in header))
    for i, row in enumerate(rows):
        cells = [str(row[0])]
        for j in (1, 2, 3, 4):
            growth = f" (x{row[j] / rows[i - 1][j]:.2f})" if i else ""
            cells.append(f"{row[j] / 2**20:.1f}{growth}")
        cells.append(f"{row[4] / row[2]:.1f}x grad")
        print("".join(f"{x:>20}" for x in cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--block_kv", type=int, default=256)
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--v32_seq_lens", type=int, nargs="+",
                        default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--block_q", type=int, default=64)
    parser.add_argument("--block_k", type=int, default=256)
    args = parser.parse_args(argv)
    n, h, r, v = args.heads, 16, 8, 16

    fns = {
        "reference": lambda *a: mla_attention_reference(*a, sm_scale=0.1,
                                                        block_kv=args.block_kv),
        "naive": lambda *a: mla_attention_naive(*a, sm_scale=0.1),
    }
    rows = []
    for s in args.seq_lens:
        shapes = [(1, s, n, h), (1, s, n, r), (1, s, n, h), (1, s, r), (1, s, n, v)]
        inputs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
        row = [s]
        for fn in fns.values():
            row.append(temp_bytes(fn, inputs))
            grad = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3, 4))
            row.append(temp_bytes(grad, inputs))
        rows.append(row)

    print(f"jax {jax.__version__} on {jax.default_backend()}, N={n}, H={h}, R={r}, V={v}, "
          f"chunk={args.block_kv}, f32; temp MiB (x growth vs previous row)")
    header = ["T=S", "ref fwd", "ref grad", "naive fwd", "naive grad"]
    print("".join(f"{x:>20}" for x in header))
    for i, row in enumerate(rows):
        cells = [str(row[0])]
        for j in (1, 2, 3, 4):
            growth = f" (x{row[j] / rows[i - 1][j]:.2f})" if i else ""
            cells.append(f"{row[j] / 2**20:.1f}{growth}")
        print("".join(f"{x:>20}" for x in cells))
    if args.v32_seq_lens:
        v32_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
