"""Grouped expert SwiGLU on one device: `grouped_swiglu` blocked vs `ragged_dot` vs a dense
lower bound, forward and forward + backward, interleaved.

    python bench/grouped_ffn.py [--tokens 2048] [--experts 16] [--top_k 4] [--reps 7]
    python bench/grouped_ffn.py --memory tpu:v5p:2x2x1 [--tokens 4096 --experts 32 --top_k 8
        --d_model 7168 --d_ff 2048]

--memory TARGET: nothing runs; the forward + backward of ragged_dot and megablox (bf16) are
compiled for one compile-only chip of a TPU target (`pallas_kernels.targets`) and their
compiled memory printed (temporaries: what the step needs beyond its arguments and outputs).

ragged_dot: the same layout with `lax.ragged_dot` (XLA:CPU lowers it to a dense product
over every group). dense: the routing gives every expert exactly X = T*K/E rows, and this
case gets them already grouped: batched einsums [E, X, D] x [E, D, F], no layout or gather,
the floor for these FLOPs. All three are checked equal before timing.
Medians of --reps calls after a compile + warm-up call; ratio = time / dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from mla_moe.grouped_matmul import grouped_swiglu


def _dense(x_EXD, w_EX, gate, up, down):
    """The same FLOPs with the rows already grouped, X = T*K/E per expert: no layout, no
    gather, one batched einsum per matmul (the floor)."""
    h = jax.nn.silu(jnp.einsum("EXD,EDF->EXF", x_EXD, gate)) * jnp.einsum(
        "EXD,EDF->EXF", x_EXD, up)
    return jnp.einsum("EXF,EFD->EXD", h, down) * w_EX[..., None]


def memory(target, t, e, k, d, f):
    """Compiles ragged_dot's and megablox's forward + backward for one chip of `target` and
    prints their memory_analysis (GiB)."""
    import numpy as np

    from pallas_kernels import aot, targets

    mesh = jax.sharding.Mesh(np.array([targets.devices(target)[0]]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    bf = jnp.bfloat16
    shapes = [((t, d), bf), ((t, k), jnp.int32), ((t, k), jnp.float32), ((e, d, f), bf),
              ((e, d, f), bf), ((e, f, d), bf)]
    args = [jax.ShapeDtypeStruct(s, dt, sharding=rep) for s, dt in shapes]
    print(f"{target}: rows={t * k} (T={t} K={k}) E={e} D={d} F={f} bf16, forward + backward")
    print(f"{'case':12s} {'temp GiB':>9s} {'args GiB':>9s} {'out GiB':>8s}  VMEM per kernel")
    for name in ("ragged_dot", "megablox"):
        def step(x, experts, weights, gate, up, down, impl=name):
            def fwd(*a):
                return grouped_swiglu(a[0], experts, *a[1:], implementation=impl)

            y, vjp = jax.vjp(fwd, x, weights, gate, up, down)
            return y, vjp(y)

        with jax.set_mesh(mesh):
            compiled = jax.jit(step).lower(*args).compile()
        m = compiled.memory_analysis()
        print(f"{name:12s} {m.temp_size_in_bytes / 2**30:9.3f} "
              f"{m.argument_size_in_bytes / 2**30:9.3f} {m.output_size_in_bytes / 2**30:8.3f}  "
              f"{aot.tpu_vmem_bytes(compiled)}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", metavar="TARGET", default=None,
                    help="compile for this TPU target (e.g. tpu:v5p:2x2x1) and print memory")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top_k", type=int, default=4)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--d_ff", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    t, e, k, d, f = args.tokens, args.experts, args.top_k, args.d_model, args.d_ff
    if args.memory:
        jax.config.update("jax_platforms", "cpu")  # compile-only devices; nothing runs
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another libtpu user
        return memory(args.memory, t, e, k, d, f)
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (t, d))
    # Equal groups with distinct experts per token: slot k of token t goes to expert
    # k * (E/K) + t mod (E/K), so every expert gets X = T*K/E rows.
    per_slot = e // k
    experts = (jnp.arange(k)[None, :] * per_slot + (jnp.arange(t) % per_slot)[:, None]
               ).astype(jnp.int32)
    weights = jax.random.uniform(keys[1], (t, k))
    gate, up = (jax.random.normal(kk, (e, d, f)) * d**-0.5 for kk in keys[2:4])
    down = jax.random.normal(keys[4], (e, f, d)) * f**-0.5
    # Expert e = k * (E/K) + r holds tokens r, r + E/K, ... of slot k.
    tok_EX = (jnp.arange(e) % per_slot)[:, None] + per_slot * jnp.arange(t * k // e)[None, :]
    slot_E = jnp.arange(e) // per_slot
    x_EXD, w_EX = x[tok_EX], weights[tok_EX, slot_E[:, None]]

    def make(name, train):
        if name == "dense":
            fwd, operands = _dense, (x_EXD, w_EX, gate, up, down)
        else:
            def fwd(x, w, g, u, dn, impl=name):
                return grouped_swiglu(x, experts, w, g, u, dn, implementation=impl)
            operands = (x, weights, gate, up, down)
        fn = fwd
        if train:
            def fn(*a):
                return jax.grad(lambda *b: jnp.sum(fwd(*b) ** 2), argnums=(0, 1, 2, 3, 4))(*a)
        return jax.jit(fn), operands

    cases = {(n, tr): make(n, tr) for tr in (False, True)
             for n in ("blocked", "ragged_dot", "dense")}
    dense_fn, dense_ops = cases[("dense", False)]
    ref_TD = jnp.zeros((t, d)).at[tok_EX].add(dense_fn(*dense_ops))
    for (name, train), (fn, ops) in cases.items():
        if not train and name != "dense":
            err = float(jnp.abs(fn(*ops) - ref_TD).max())
            assert err < 1e-3 * float(jnp.abs(ref_TD).max()), (name, err)
        jax.block_until_ready(fn(*ops))
        jax.block_until_ready(fn(*ops))
    samples = {c: [] for c in cases}
    for _ in range(args.reps):
        for c, (fn, ops) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*ops))
            samples[c].append(time.perf_counter() - start)
    med = {c: statistics.median(v) for c, v in samples.items()}
    print(f"jax {jax.__version__}, {jax.default_backend()}, T={t} K={k} E={e} D={d} F={f}, "
          f"reps={args.reps}", file=sys.stderr)
    print(f"{'case':24s} {'ms':>9s} {'dense ms':>9s} {'ratio':>7s}")
    for (name, train), v in med.items():
        base = med[("dense", train)]
        tag = f"{name} {'fwd+bwd' if train else 'fwd'}"
        print(f"{tag:24s} {v * 1e3:9.2f} {base * 1e3:9.2f} {v / base:7.2f}")


if __name__ == "__main__":
    main()
