"""Peak temporary memory of the chunked XLA MLA reference vs the dense oracle, by T = S.

Compile-only (nothing runs): XLA's memory_analysis().temp_size_in_bytes of the jitted forward
and of the gradient of all five inputs, f32, B=1. The chunked reference should grow ~2x per
doubling of the sequence (linear), the dense oracle ~4x ([B, N, T, S] scores).

Usage: python bench/attention_memory.py [--heads 2] [--block_kv 256] [--seq_lens 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pallas_kernels import mla_attention_naive, mla_attention_reference  # noqa: E402


def temp_bytes(fn, args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--block_kv", type=int, default=256)
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[2048, 4096, 8192])
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
