"""Train-step throughput and MFU on CPU: the tiny config and a larger one (hidden 512).

    python bench/train_cpu.py [--steps=3]

MFU = model FLOPs per step (mla_moe.flops_per_token: 6 x active matmul params + causal
attention) / step time / the FLOP/s of a large float32 matmul timed in the same run (before
and after each case; the higher median is the peak). Prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import jax
import jax.numpy as jnp

from mla_moe.train.bench import matmul_flops, time_train_step
from mla_moe.train.config import run_config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny  # noqa: E402


def larger_config():
    model = tiny.model_config()
    model.update(dict(
        hidden_size=512, intermediate_size=1536, moe_intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=0,
    ))
    return run_config(model, train=dict(batch_size=8, seq_len=256, steps=100, warmup_steps=10),
                      mesh=dict(data=1))


def tiny_config():
    c = tiny.get_config()
    c.mesh.data = 1
    return c


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--matmul_n", type=int, default=2048)
    args = parser.parse_args()
    rows = []
    for name, make in (("tiny", tiny_config), ("cpu-512", larger_config)):
        config = make()
        config.mesh.data = jax.device_count()
        peak_before = matmul_flops(args.matmul_n, jnp.float32)
        r = time_train_step(config, args.steps)
        peak = max(peak_before, matmul_flops(args.matmul_n, jnp.float32))
        rows.append((name, config, r, peak))
        print(f"{name}: {r['params'] / 1e6:.1f}M params ({r['active'] / 1e6:.1f}M active), "
              f"batch {config.train.batch_size}x{config.train.seq_len}, compile "
              f"{r['compile_s']:.0f}s, step {r['step_s'] * 1e3:.0f} ms", flush=True)
    print(f"\n{datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) | jax {jax.__version__}")
    print(f"{'case':<10}{'tokens/s':>10}{'model GFLOP/s':>15}{'f32 matmul GFLOP/s':>20}"
          f"{'MFU':>8}{'target':>8}")
    for name, _, r, peak in rows:
        target = ">=0.30" if name != "tiny" else "-"
        print(f"{name:<10}{r['tokens_per_s']:>10,.0f}{r['flops_per_s'] / 1e9:>15.2f}"
              f"{peak / 1e9:>20.2f}{r['flops_per_s'] / peak:>8.3f}{target:>8}")


if __name__ == "__main__":
    main()
