"""f32 matmul speed on this CPU, XLA against PyTorch, at the shapes of bench/model_cpu.py's step.

    python bench/matmul_cpu.py [--repeats 15]

Each case is one jitted einsum (XLA:CPU) and the same `torch.einsum`, on the same arrays,
timed interleaved (one call of each per repeat, medians). GFLOP/s = 2 x the product's
multiply-adds / time. The model step spends ~60% of its time in these products
(bench/profile_cpu.py), so their ratio bounds what the whole step can gain over transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# name -> (einsum, lhs shape, rhs shape): bench/model_cpu.py's step has 8 x 256 = 2048 tokens,
# hidden 256, 4 heads of 64 (+32 rope) columns, experts of width 128 (512 rows each on average,
# scanned in blocks of 128 rows), a 4096-token vocabulary.
CASES = {
    "head [2048,256]x[256,4096]": ("md,dn->mn", (2048, 256), (256, 4096)),
    "projection [2048,256]x[256,256]": ("md,dn->mn", (2048, 256), (256, 256)),
    "weight grad [256,2048]x[2048,256]": ("dm,mn->dn", (256, 2048), (2048, 256)),
    "expert [512,256]x[256,128]": ("md,dn->mn", (512, 256), (256, 128)),
    "expert block [128,256]x[256,128]": ("md,dn->mn", (128, 256), (256, 128)),
    "16 experts [16,512,256]x[16,256,128]": ("emd,edn->emn", (16, 512, 256), (16, 256, 128)),
    "scores [32,256,96]x[32,256,96]^T": ("bqd,bkd->bqk", (32, 256, 96), (32, 256, 96)),
    "probs x values [32,256,256]x[32,256,64]": ("bqk,bkd->bqd", (32, 256, 256), (32, 256, 64)),
}


def flops(eq: str, lhs_shape, rhs_shape) -> int:
    """2 x multiply-adds of the einsum `eq`."""
    ins, out = eq.split("->")
    a, b = ins.split(",")
    sizes = {**dict(zip(a, lhs_shape)), **dict(zip(b, rhs_shape))}
    return 2 * int(np.prod([sizes[c] for c in set(a) | set(b)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    jax.config.update("jax_default_matmul_precision", "highest")
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}")
    print(f"{'product':<42}{'XLA GFLOP/s':>12}{'torch GFLOP/s':>15}{'XLA / torch':>13}")
    ratios = []
    for name, (eq, sa, sb) in CASES.items():
        a, b = (rng.standard_normal(s, dtype=np.float32) for s in (sa, sb))
        fn = jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        np.testing.assert_allclose(np.asarray(fn(ja, jb)), torch.einsum(eq, ta, tb).numpy(),
                                   rtol=1e-4, atol=1e-3 * float(np.sqrt(sa[-1])))
        ours, theirs = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(ja, jb))
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.einsum(eq, ta, tb)
            theirs.append(time.perf_counter() - t0)
        n = flops(eq, sa, sb)
        x, t = n / statistics.median(ours) / 1e9, n / statistics.median(theirs) / 1e9
        ratios.append(x / t)
        print(f"{name:<42}{x:>12.1f}{t:>15.1f}{x / t:>13.2f}")
    print(f"{'geometric mean':<69}{float(np.exp(np.mean(np.log(ratios)))):>13.2f}")


if __name__ == "__main__":
    main()
