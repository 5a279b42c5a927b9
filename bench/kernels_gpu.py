"""GPU benchmark of the Pallas MLA kernels against their XLA reference path.

Checks first (kernel vs implementation="xla" at a small shape, forward and gradients), then
measures, in this one run: the device's copy bandwidth (a large device-to-device copy) and
bf16 matmul peak, and times
  (a) latent_attention decode at DeepSeek-V3 shape (N=128, C=512, R=64, T=1, bf16) as GB/s
      of cache bytes read (B * S * (C + R) * 2), against copy bandwidth;
  (b) mla_attention forward and backward (H=128, R=64, V=128, T=S=4K, causal, bf16) as
      TFLOP/s, counting causal FLOPs 2 * B * N * T * S / 2 * (H + R + V) forward and 2.5x
      that backward, against the matmul peak.
The backward is timed alone (the pullback of a jax.vjp taken beforehand). Each figure is the
median of --repeats runs after a warm-up, ours and the XLA baseline interleaved. The table
comes last.

Usage:  python bench/kernels_gpu.py                 # needs a GPU
        python bench/kernels_gpu.py --allow_cpu --small   # tiny shapes, interpret vs xla,
                                                          # only exercises the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pallas_kernels import latent_attention, mla_attention  # noqa: E402

TARGETS = {"decode": 0.8, "fwd": 0.5, "bwd": 0.35, "vs_xla": 1.5}


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _timed(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - start)
    return out


def time_interleaved(fns, args, repeats):
    """Median seconds of each fn, runs interleaved so drift hits all of them alike."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            acc.append(time.perf_counter() - start)
    return [statistics.median(acc) for acc in times]


def copy_bandwidth(n_bytes, repeats):
    x = _normal(jax.random.key(0), (n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)  # reads and writes every byte once
    return 2 * n_bytes / statistics.median(_timed(copy, (x,), repeats))


def matmul_peak(dim, dtype, repeats):
    a = _normal(jax.random.key(1), (dim, dim), dtype)
    b = _normal(jax.random.key(2), (dim, dim), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * dim**3 / statistics.median(_timed(mm, (a, b), repeats))


def check(ours, dtype):
    """Kernel vs the XLA reference at a small shape, forward and all gradients."""
    keys = jax.random.split(jax.random.key(3), 6)
    b, t, n, h, r, v = 1, 200, 4, 64, 32, 64
    args = [_normal(keys[0], (b, t, n, h), dtype), _normal(keys[1], (b, t, n, r), dtype),
            _normal(keys[2], (b, t, n, h), dtype), _normal(keys[3], (b, t, r), dtype),
            _normal(keys[4], (b, t, n, v), dtype)]
    errs = []
    for impl in (ours, "xla"):
        fn = lambda *a, impl=impl: mla_attention(*a, sm_scale=0.1, implementation=impl)  # noqa: E731
        out, vjp = jax.vjp(fn, *args)
        errs.append([out, *vjp(jnp.ones_like(out))])
    worst = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                / max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))), 1e-6)
                for x, y in zip(*errs))
    lengths = jnp.array([300, 17, 512, 1], jnp.int32)
    dec = [_normal(keys[0], (4, 2, 16, 128), dtype), _normal(keys[1], (4, 2, 16, 32), dtype),
           _normal(keys[2], (4, 512, 128), dtype), _normal(keys[3], (4, 512, 32), dtype)]
    outs = [latent_attention(*dec, lengths_B=lengths, sm_scale=0.1, implementation=impl)
            for impl in (ours, "xla")]
    ref_scale = max(float(jnp.max(jnp.abs(outs[1].astype(jnp.float32)))), 1e-6)
    worst = max(worst, float(jnp.max(jnp.abs(outs[0].astype(jnp.float32)
                                             - outs[1].astype(jnp.float32)))) / ref_scale)
    print(f"check {ours} vs xla (max |diff| / max |xla|, fwd + grads + decode): {worst:.2e}")
    return worst < (2e-2 if dtype == jnp.bfloat16 else 1e-4)


def bench_decode(ours, batch, cache, n, c, r, dtype, repeats):
    keys = jax.random.split(jax.random.key(4), 4)
    args = (_normal(keys[0], (batch, 1, n, c), dtype), _normal(keys[1], (batch, 1, n, r), dtype),
            _normal(keys[2], (batch, cache, c), dtype), _normal(keys[3], (batch, cache, r), dtype),
            jnp.full((batch,), cache, jnp.int32))
    fns = [jax.jit(lambda q, qp, kv, kp, l, impl=impl: latent_attention(
        q, qp, kv, kp, lengths_B=l, sm_scale=0.1, implementation=impl)) for impl in (ours, "xla")]
    cache_bytes = batch * cache * (c + r) * jnp.dtype(dtype).itemsize
    return [cache_bytes / t for t in time_interleaved(fns, args, repeats)]


def bench_mla(ours, b, n, t, h, r, v, dtype, repeats):
    keys = jax.random.split(jax.random.key(5), 6)
    args = (_normal(keys[0], (b, t, n, h), dtype), _normal(keys[1], (b, t, n, r), dtype),
            _normal(keys[2], (b, t, n, h), dtype), _normal(keys[3], (b, t, r), dtype),
            _normal(keys[4], (b, t, n, v), dtype))
    do_BTNV = _normal(keys[5], (b, t, n, v), dtype)

    def attention(impl):
        return lambda *a: mla_attention(*a, sm_scale=0.1, implementation=impl)

    fwd = [jax.jit(attention(impl)) for impl in (ours, "xla")]
    t_fwd = time_interleaved(fwd, args, repeats)
    # Backward alone: the vjp closure (a pytree holding the residuals) is a jit argument.
    pullbacks = [jax.vjp(attention(impl), *args)[1] for impl in (ours, "xla")]
    run_pullback = jax.jit(lambda pullback, do: pullback(do))
    t_bwd = time_interleaved([lambda do, p=p: run_pullback(p, do) for p in pullbacks],
                             (do_BTNV,), repeats)
    flops = 2 * b * n * t * t / 2 * (h + r + v)
    return [flops / x for x in t_fwd], [2.5 * flops / x for x in t_bwd]


def main(argv=None, platform="gpu"):
    """Checks and times the kernels on `platform` ("gpu", or "tpu" from bench/kernels_tpu.py)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--allow_cpu", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny shapes (script check)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mla_batch", type=int, default=1)
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == platform
    if not on_gpu and not (args.allow_cpu and args.small):
        print(f"this benchmark needs a {platform.upper()} (jax backend is "
              f"{jax.default_backend()!r}); run with --allow_cpu --small to exercise the script "
              "on CPU.")
        return 0
    ours = platform if on_gpu else "interpret"
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, ours={ours!r}")
    if args.small:
        dtype, decode_n, c, r, batches, caches = jnp.float32, 8, 64, 16, (2,), (256, 512)
        mla_cases, (h, rr, v, t), copy_bytes, mm_dim = [(2, 1)], (32, 16, 32, 128), 1 << 24, 512
    else:
        dtype, decode_n, c, r, batches = jnp.bfloat16, 128, 512, 64, (64, 128)
        caches = (1024, 2048, 4096, 8192, 16384)
        mla_cases, (h, rr, v, t) = [(16, args.mla_batch), (128, args.mla_batch)], (128, 64, 128,
                                                                                    4096)
        copy_bytes, mm_dim = 4 << 30, 8192
    ok = check(ours, dtype)
    bandwidth = copy_bandwidth(copy_bytes, args.repeats)
    peak = matmul_peak(mm_dim, dtype, args.repeats)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {jnp.dtype(dtype).name} matmul "
          f"{peak / 1e12:.2f} TFLOP/s ({mm_dim}^3)")

    rows = []  # (case, ours, xla, unit, peak)
    for batch in batches:
        for cache in caches:
            got, base = bench_decode(ours, batch, cache, decode_n, c, r, dtype, args.repeats)
            rows.append((f"decode B={batch} S={cache}", got, base, "GB/s", bandwidth,
                         TARGETS["decode"]))
    for n, b in mla_cases:
        fwd, bwd = bench_mla(ours, b, n, t, h, rr, v, dtype, args.repeats)
        rows.append((f"mla fwd B={b} N={n} T=S={t}", *fwd, "TFLOP/s", peak, TARGETS["fwd"]))
        rows.append((f"mla bwd B={b} N={n} T=S={t}", *bwd, "TFLOP/s", peak, TARGETS["bwd"]))

    print(f"\n{'case':34} {'ours':>10} {'xla':>10} {'unit':>8} {'ours/xla':>9} "
          f"{'of peak':>8}  target")
    for case, got, base, unit, ref_peak, target in rows:
        scale = 1e9 if unit == "GB/s" else 1e12
        print(f"{case:34} {got / scale:10.2f} {base / scale:10.2f} {unit:>8} {got / base:9.2f} "
              f"{got / ref_peak:8.2f}  >= {target} of peak, >= {TARGETS['vs_xla']}x xla")
    if not on_gpu:
        print("(CPU --small run: interpret-mode timings only exercise the script; they are not "
              "kernel performance)")
    if not ok:
        print("CHECK FAILED: kernel and XLA reference disagree (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
