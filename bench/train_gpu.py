"""MFU of a DeepSeek-V2-Lite-shaped slice on one GPU: full width, 3 layers (1 dense + 2 MoE),
seq 4096, bf16 compute with float32 master weights, against a bf16 matmul timed in the same run.

    python bench/train_gpu.py [--layers=3 --batch=2 --steps=5]

Refuses (exit 0, a message) without a GPU. Record the table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp

from mla_moe.train.bench import matmul_flops, time_train_step
from mla_moe.train.config import run_config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import deepseek_v2_lite  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="dots")
    parser.add_argument("--moe_impl", default="dropless")
    args = parser.parse_args()
    if jax.devices()[0].platform != "gpu":
        print(f"bench/train_gpu.py needs a GPU; this machine has {jax.devices()[0].platform} "
              "devices only. Nothing measured.")
        return 0
    model = deepseek_v2_lite.model_config()
    model.update(dict(num_hidden_layers=args.layers, dtype="bfloat16", param_dtype="float32",
                      remat_policy=args.remat, moe_impl=args.moe_impl, attention_impl="auto"))
    config = run_config(model, train=dict(batch_size=args.batch, seq_len=args.seq_len,
                                          steps=100, warmup_steps=10), mesh=dict(data=1))
    peak_before = matmul_flops(8192, jnp.bfloat16)
    r = time_train_step(config, args.steps)
    peak = max(peak_before, matmul_flops(8192, jnp.bfloat16))
    dev = jax.devices()[0].device_kind
    print(f"\n{datetime.date.today()} | {dev} | jax {jax.__version__} | "
          f"{r['params'] / 1e9:.2f}B params ({r['active'] / 1e9:.2f}B active)")
    print(f"{'case':<28}{'tokens/s':>10}{'model TFLOP/s':>15}{'bf16 matmul TFLOP/s':>21}"
          f"{'MFU':>8}{'target':>8}")
    case = f"v2-lite x{args.layers} b{args.batch} s{args.seq_len}"
    print(f"{case:<28}{r['tokens_per_s']:>10,.0f}{r['flops_per_s'] / 1e12:>15.1f}"
          f"{peak / 1e12:>21.1f}{r['flops_per_s'] / peak:>8.3f}{'>=0.40':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
