"""TPU benchmark of the Pallas MLA kernels, or, without a TPU, what they need on each target.

On a TPU: the same checks and timings as bench/kernels_gpu.py (kernel vs the XLA reference,
decode bandwidth and flash TFLOP/s against the chip's copy bandwidth and matmul peak).

Anywhere else (--compile_only, the default without a TPU): compiles every kernel for TPU v4,
v5e, v5p, v6e and for A100 / H100 / H200 at DeepSeek-V3 shapes with the real compilers (libtpu,
XLA:GPU + Triton; nothing runs) and prints, per target x kernel x shape, whether it compiled
and its on-chip footprint against the target's limit: scoped VMEM for the TPU kernels,
shared memory per block for the Triton ones. No speed is read from these compiles.

Usage:  python bench/kernels_tpu.py                  # on a TPU: timings
        python bench/kernels_tpu.py --compile_only   # any host: the compile table
        python bench/kernels_tpu.py --compile_only --markdown   # the table for RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--compile_only" in sys.argv or __name__ != "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; no driver lookups

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["tpu:v4:2x2x1", "tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v6e:2x2", "gpu:a100:1x1x1",
           "gpu:h100:1x1x1", "gpu:h200:1x1x1"]
TRAIN = [dict(b=1, t=4096, n=128, segments=True), dict(b=1, t=16384, n=16),
         dict(b=1, t=65536, n=16)]
DECODE = [dict(b=1, t=1, s=163840), dict(b=64, t=1, s=32768), dict(b=256, t=2, s=4096)]


def _shape(kind, shape):
    if kind == "mla":
        seg = ", packed" if shape.get("segments") else ""
        return f"fwd+bwd B={shape['b']} N={shape['n']} T=S={shape['t'] // 1024}K{seg}"
    return f"decode B={shape['b']} T={shape['t']} S={shape['s']}"


def compile_table(targets_: list[str]) -> list[tuple]:
    """(target, kernel call, ok, footprint bytes by kernel, limit bytes, compile s) rows."""
    from pallas_kernels import aot, targets

    calls = [("mla", s) for s in TRAIN] + [("latent", s) for s in DECODE]
    rows = []
    for target in targets_:
        if target.startswith("tpu"):
            limit = aot.vmem_limit_bytes(targets.devices(target)[0].device_kind)
            for kind, shape in calls:
                start = time.perf_counter()
                result = aot.run_call(kind, target, **shape)
                rows.append((target, _shape(kind, shape), result["ok"], result.get("vmem", {}),
                             limit, time.perf_counter() - start, result["error"]))
        else:
            limit = aot.shared_memory_limit_bytes(targets.parse_target(target).chip)
            start = time.perf_counter()
            results = aot.gpu_compile_log([dict(kind=k, target=target, **s) for k, s in calls])
            each = (time.perf_counter() - start) / len(calls)
            for (kind, shape), result in zip(calls, results, strict=True):
                sizes = {f"kernel {i}": b for i, b in enumerate(result["shared_memory"])}
                rows.append((target, _shape(kind, shape), result["ok"], sizes, limit, each,
                             result["error"]))
    return rows


def print_table(rows, markdown: bool):
    head = ("target", "kernels and shape", "compiles", "footprint per kernel (KiB)",
            "limit (KiB)", "max / limit")
    fmt = "| {} | {} | {} | {} | {} | {} |" if markdown else "{:16} {:40} {:8} {:34} {:>11} {:>11}"
    print(fmt.format(*head))
    if markdown:
        print("|" + "---|" * len(head))
    for target, case, ok, sizes, limit, _, error in rows:
        kib = ", ".join(f"{name.replace('mla_attention_', '').replace('latent_attention_', '')}"
                        f" {b / 1024:.0f}" for name, b in sorted(sizes.items()))
        worst = max(sizes.values(), default=0) / limit
        print(fmt.format(target, case, "yes" if ok else "NO", kib or error[:60],
                         f"{limit / 1024:.0f}", f"{worst:.2f}"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile_only", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--targets", nargs="*", default=TARGETS)
    args, rest = parser.parse_known_args(argv)
    import jax

    if args.compile_only or jax.default_backend() != "tpu":
        print(f"jax {jax.__version__}: compile-only, {len(args.targets)} targets")
        rows = compile_table(args.targets)
        print_table(rows, args.markdown)
        return 0 if all(ok for _, _, ok, *_ in rows) else 1
    import kernels_gpu

    return kernels_gpu.main(rest, platform="tpu")


if __name__ == "__main__":
    sys.exit(main())
