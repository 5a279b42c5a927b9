"""The chunked cross-entropy (`train.loss_chunk_tokens`) against the whole-logits loss.

    python bench/chunked_loss.py [--target=tpu:v5p:2x2x1] [--tokens 6x8192 4x8192]
                                 [--chunk_tokens=8192] [--rounds=4] [--steps=4]

1. Memory, compile-only (nothing runs): the V3 head (D 7168 x vocabulary 129,280, bf16
   hidden states, f32 logits), loss forward and the gradient w.r.t. the hidden states and the
   head, on one device of TARGET; temporaries and peak (arguments + outputs + temporaries) in
   GiB for the whole logits and for the chunked loss, per tokens-per-chip shape B x T.
2. Time, on this host: the tiny preset's train step (1 device) with `loss_chunk_tokens` 0
   (whole logits) and CHUNK, interleaved: ROUNDS rounds of STEPS timed steps each per setting
   (the compile of each round is not timed); prints the median step of each and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny  # noqa: E402

V3_D, V3_U = 7168, 129_280
GIB = 2**30


def head_memory(target: str, b: int, t: int, chunk_tokens: int) -> dict[str, tuple]:
    """{"whole"|"chunked": (temp GiB, peak GiB)} of the V3 head's loss and gradient."""
    from mla_moe import losses
    from pallas_kernels import targets

    mesh = jax.sharding.Mesh(np.array([targets.devices(target)[0]]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = (jax.ShapeDtypeStruct((b, t, V3_D), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((V3_D, V3_U), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rep))

    def whole(x_BTD, w_DU, targets_BT):
        logits_BTU = jnp.einsum("BTD,DU->BTU", x_BTD, w_DU.astype(x_BTD.dtype),
                                preferred_element_type=jnp.float32)
        loss, n = losses.cross_entropy(logits_BTU, targets_BT)
        return loss / n

    def chunked(x_BTD, w_DU, targets_BT):
        loss, n = losses.chunked_cross_entropy(x_BTD, w_DU, targets_BT,
                                               chunk_tokens=chunk_tokens)
        return loss / n

    out = {}
    for name, fn in (("whole", whole), ("chunked", chunked)):
        with jax.set_mesh(mesh):
            m = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
            m = m.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        out[name] = (m.temp_size_in_bytes / GIB, (peak - m.alias_size_in_bytes) / GIB)
    return out


def step_times(chunk_tokens: int, rounds: int, steps: int) -> dict[int, list[float]]:
    """{loss_chunk_tokens: [step seconds]} for 0 and `chunk_tokens`, interleaved by round."""
    from mla_moe.train.bench import time_train_step

    times = {0: [], chunk_tokens: []}
    for _ in range(rounds):
        for chunk in times:
            config = tiny.get_config()
            config.mesh.data = 1
            config.train.loss_chunk_tokens = chunk
            times[chunk].extend(time_train_step(config, steps)["step_times_s"])
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="tpu:v5p:2x2x1")
    ap.add_argument("--tokens", nargs="+", default=["6x8192", "4x8192"])
    ap.add_argument("--chunk_tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; CPU runs

    print(f"{datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"jax {jax.__version__}")
    print(f"\nV3 head on one {args.target} device, loss + gradient (GiB)")
    print(f"{'tokens per chip':<18}{'whole temp':>12}{'whole peak':>12}"
          f"{'chunked temp':>14}{'chunked peak':>14}")
    for shape in args.tokens:
        b, t = (int(x) for x in shape.split("x"))
        m = head_memory(args.target, b, t, args.chunk_tokens)
        print(f"{f'{b * t:,} ({shape})':<18}{m['whole'][0]:>12.2f}{m['whole'][1]:>12.2f}"
              f"{m['chunked'][0]:>14.2f}{m['chunked'][1]:>14.2f}", flush=True)

    times = step_times(args.chunk_tokens, args.rounds, args.steps)
    whole, chunked = (statistics.median(times[k]) * 1e3 for k in times)
    print(f"\ntiny preset, 1 {jax.devices('cpu')[0].platform} device, "
          f"{args.rounds} x {args.steps} interleaved steps each: median step "
          f"{whole:.1f} ms whole, {chunked:.1f} ms chunked ({args.chunk_tokens}), "
          f"ratio {chunked / whole:.2f}")


if __name__ == "__main__":
    main()
