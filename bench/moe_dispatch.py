"""MoE layer time per dispatch strategy on 8 simulated CPU devices, as ratios.

    python bench/moe_dispatch.py [--tokens 1024] [--reps 7] [--parts 1 2]

Part 1: forward time of one MoE layer for each `moe_dispatch` on the meshes expert=8 and
data=2 x expert=4, and for the unsharded layer (one device, no mesh), interleaved; ratio =
strategy / unsharded. On CPU the 8 "devices" share the host's cores, so a ratio says what the
dispatch costs on top of the same arithmetic, not what a real pod would gain.
Part 2: fixed active FLOPs (tokens x top-k x expert width constant), unsharded dropless layer,
forward ("fwd") and forward + backward ("train"), at `--scaling_tokens` (default 1024, 4096
and 16384: the E=64, k=2 layer then gets 32, 128 and 512 rows per expert):
  8 -> 64 experts at equal k and width           target: cost <= 1.3x
  fine-grained (64 experts, k=16, width/8) vs coarse (8 experts, k=2)   target: >= 0.7 of the
  coarse throughput.
plus each ratio again for a floor: the same products with no routing, layout, padding or
gathers (gate and up fused exactly when `grouped_swiglu` fuses them). Forward, that is the
best a grouped implementation can do on this backend with these matrix shapes; for "train" it
is the autodiff of those products, which the custom backward of `grouped_swiglu` can beat,
so there it is a reference, not a bound.
  8 -> 64 experts: "grouped floor", every expert given exactly T*k/E rows, already grouped,
    one scan step per expert ([T*k/E, D] x [D, 2F], [T*k/E, F] x [F, D]).
  fine vs coarse: "dense floor", the same FLOPs as plain [T*k, D] x [D, 2F] and
    [T*k, F] x [F, D] products.
Medians of `--reps` timed calls after a compile + warm-up call, fresh random inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mla_moe import ModelConfig, grouped_matmul, sharding  # noqa: E402
from mla_moe.moe import MoE  # noqa: E402

D = 128


def _config(experts: int, k: int, width: int, **over) -> ModelConfig:
    return ModelConfig(
        vocab_size=256, hidden_size=D, intermediate_size=4 * D, moe_intermediate_size=width,
        num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=experts, n_shared_experts=0,
        num_experts_per_tok=k, topk_method="greedy", scoring_func="softmax", **over,
    )


def _layer_fn(cfg: ModelConfig, mesh, train=False):
    """A jitted forward (or forward + backward) of one MoE layer, sharded when `mesh` is
    given, and its inputs."""
    graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))

    def fwd(state, x):
        out = nnx.merge(graphdef, state)(x)
        return out.y_BTD, out.stats.aux_loss

    def loss(state, x):
        y, aux = fwd(state, x)
        return jnp.mean(jnp.square(y)) + aux

    step = jax.grad(loss, argnums=(0, 1)) if train else fwd
    if mesh is None:
        return jax.jit(step), state, None
    with sharding.use_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        fn = jax.jit(step)
    return fn, state, sharding.batch_sharding(mesh)


def _timer(cfg, mesh, tokens, seed=0, train=False):
    fn, state, x_sharding = _layer_fn(cfg, mesh, train)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))

    def once():
        x = jax.random.normal(next(keys), (tokens // 16, 16, D), jnp.float32)
        if x_sharding is not None:
            x = jax.device_put(x, x_sharding)
        x = jax.block_until_ready(x)
        ctx = sharding.use_mesh(mesh) if mesh is not None else _null()
        with ctx:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, x))
        return time.perf_counter() - t0

    once()  # compile
    once()  # warm-up
    return once


def _swiglu(x_XD, gate_up_D2F, down_FD):
    f = down_FD.shape[0]
    if 2 * f <= grouped_matmul.FUSE_MAX_WIDTH:
        au_X2F = x_XD @ gate_up_D2F
        h_XF = jax.nn.silu(au_X2F[:, :f]) * au_X2F[:, f:]
    else:
        h_XF = jax.nn.silu(x_XD @ gate_up_D2F[:, :f]) * (x_XD @ gate_up_D2F[:, f:])
    return h_XF @ down_FD


def _floor_timer(tokens, k, width, experts=None, seed=0, train=False):
    """The layer's expert FLOPs without routing: dense products of all T*k rows (experts=None),
    or exactly T*k/E rows per expert, already grouped, one scan step per expert."""
    m, f = tokens * k, width

    if experts is None:
        ffn, lead = _swiglu, ()
    else:
        def ffn(x_EXD, gate_up_ED2F, down_EFD):
            return jax.lax.scan(lambda c, xs: (c, _swiglu(*xs)), None,
                                (x_EXD, gate_up_ED2F, down_EFD))[1]

        lead, m = (experts,), m // experts

    def loss(*args):
        return jnp.sum(jnp.sin(ffn(*args)))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)) if train else ffn)
    ks = jax.random.split(jax.random.key(seed), 3)
    args = (jax.random.normal(ks[0], (*lead, m, D)),
            0.05 * jax.random.normal(ks[1], (*lead, D, 2 * f)),
            0.05 * jax.random.normal(ks[2], (*lead, f, D)))

    def once():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    once()
    once()
    return once


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _interleaved(timers: dict, reps: int) -> dict[str, float]:
    samples = {name: [] for name in timers}
    for _ in range(reps):
        for name, t in timers.items():
            samples[name].append(t())
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--scaling_tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, "
          f"tokens={args.tokens}, D={D}, reps={args.reps}", file=sys.stderr)

    rows = []
    # --- part 1: dispatch strategies ------------------------------------------------------------
    base = _config(64, 6, 64)
    timers = {"unsharded": _timer(base, None, args.tokens)} if 1 in args.parts else {}
    for mesh_shape in (dict(expert=8), dict(data=2, expert=4)) if 1 in args.parts else ():
        mesh = sharding.make_mesh(mesh_shape, config=base)
        tag = " x ".join(f"{k}={v}" for k, v in mesh_shape.items())
        for kind in ("all_to_all", "ragged_all_to_all", "allgather", "auto"):
            timers[f"{kind} [{tag}]"] = _timer(base.replace(moe_dispatch=kind), mesh, args.tokens)
    med = _interleaved(timers, args.reps)
    for name, t in med.items():
        rows.append((f"E=64 k=6: {name}", t, med["unsharded"], t / med["unsharded"],
                     "(report)"))

    # --- part 2: scaling at fixed active FLOPs -------------------------------------------------
    width = 256
    cases = {
        "coarse E=8 k=2 F=256": _config(8, 2, width),
        "E=64 k=2 F=256": _config(64, 2, width),
        "fine E=64 k=16 F=32": _config(64, 16, width // 8),
    }
    for tokens in args.scaling_tokens if 2 in args.parts else ():
        for mode in ("fwd", "train"):
            train = mode == "train"
            floor = "(reference)" if train else "(floor)"
            timers = {n: _timer(c, None, tokens, seed=1, train=train) for n, c in cases.items()}
            timers["grouped floor E=8"] = _floor_timer(tokens, 2, width, 8, train=train)
            timers["grouped floor E=64"] = _floor_timer(tokens, 2, width, 64, train=train)
            timers["dense coarse"] = _floor_timer(tokens, 2, width, train=train)
            timers["dense fine"] = _floor_timer(tokens, 16, width // 8, train=train)
            med2 = _interleaved(timers, args.reps)
            coarse = med2["coarse E=8 k=2 F=256"]
            more = med2["E=64 k=2 F=256"]
            fine = med2["fine E=64 k=16 F=32"]
            tag = f"T={tokens} {mode}"
            rows.append((f"{tag}: 8 -> 64 experts (time)", more, coarse, more / coarse, "<= 1.3"))
            rows.append((f"{tag}: the same, grouped floor", med2["grouped floor E=64"],
                         med2["grouped floor E=8"],
                         med2["grouped floor E=64"] / med2["grouped floor E=8"], floor))
            rows.append((f"{tag}: fine vs coarse throughput", fine, coarse, coarse / fine,
                         ">= 0.7"))
            rows.append((f"{tag}: the same, dense floor", med2["dense fine"],
                         med2["dense coarse"], med2["dense coarse"] / med2["dense fine"],
                         floor))

    print(f"{'case':44s} {'ours (ms)':>10s} {'baseline (ms)':>14s} {'ratio':>7s}  target")
    for name, ours, baseline, ratio, target in rows:
        print(f"{name:44s} {ours * 1e3:10.2f} {baseline * 1e3:14.2f} {ratio:7.2f}  {target}")


if __name__ == "__main__":
    main()
