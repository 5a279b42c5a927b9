"""Does the tiny preset train the same with bfloat16 Adam moments (`train.moment_dtype`)?

    python bench/moment_dtype.py [--seeds=0,1,2] [--steps=150] [--workdir=DIR]

Trains configs/tiny.py (the README quickstart run: 150 steps on the bundled corpus) once per
seed and moment dtype, on this host's devices. A seed fixes the initialisation and the data
order, so the two dtypes of one seed see the same batches. Prints, per run, the train loss at
steps 50/100/150 and the final validation loss; then per dtype the mean and the spread (max -
min) over seeds; then bfloat16 - float32: the difference of the means, the paired difference
per seed, and whether |difference of means| lies within the float32 seed spread ("trains the
same"). Results also go to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import jax

from mla_moe.train import train
from mla_moe.train.compilation_cache import enable_compilation_cache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny  # noqa: E402

DTYPES = ("float32", "bfloat16")
LOSS_STEPS = (50, 100, 150)
COLUMNS = [f"loss@{s}" for s in LOSS_STEPS] + ["val"]


def run_one(seed: int, dtype: str, steps: int, workdir: str) -> dict:
    """Trains one run from scratch; {column: value} from its metrics.jsonl."""
    config = tiny.get_config()
    config.seed = seed
    config.train.steps = steps
    config.train.moment_dtype = dtype
    config.mesh.data = jax.device_count()
    config.log.tensorboard = False
    config.checkpoint.every_steps = steps  # one save at the end: checkpoints are not measured
    config.checkpoint.max_to_keep = 1
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    train(config, workdir)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = {r["step"]: r for r in map(json.loads, f)}
    row = {f"loss@{s}": records[s]["loss"] for s in LOSS_STEPS if s in records}
    row["val"] = records[steps]["val_loss"]
    row["wall_s"] = wall
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    return row


def _mean(xs):
    return sum(xs) / len(xs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "mla_moe_moment_dtype"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    enable_compilation_cache(os.path.join("~", ".cache", "mla_moe", "jax"))
    os.makedirs(args.workdir, exist_ok=True)

    rows = {}  # (seed, dtype) -> row
    for seed in seeds:
        for dtype in DTYPES:  # both dtypes of a seed back to back: a partial log stays paired
            row = run_one(seed, dtype, args.steps, os.path.join(args.workdir, f"{dtype}_{seed}"))
            rows[seed, dtype] = row
            print(f"seed {seed} {dtype}: " + " ".join(
                f"{c} {row[c]:.4f}" for c in COLUMNS if c in row)
                + f" ({row['wall_s']:.0f} s)", flush=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump([dict(seed=s, dtype=d, **r) for (s, d), r in rows.items()], f, indent=1)

    cols = [c for c in COLUMNS if all(c in r for r in rows.values())]
    print(f"\n{datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) | jax {jax.__version__} "
          f"| configs/tiny.py, {args.steps} steps, seeds {args.seeds}")
    head = f"{'run':<22}" + "".join(f"{c:>10}" for c in cols)
    print(head)
    for (seed, dtype), r in rows.items():
        print(f"{f'seed {seed} {dtype}':<22}" + "".join(f"{r[c]:>10.4f}" for c in cols))
    stats = {}
    for dtype in DTYPES:
        vals = {c: [rows[s, dtype][c] for s in seeds] for c in cols}
        stats[dtype] = {c: (_mean(v), max(v) - min(v)) for c, v in vals.items()}
        print(f"{f'{dtype} mean':<22}" + "".join(f"{stats[dtype][c][0]:>10.4f}" for c in cols))
        print(f"{f'{dtype} spread':<22}" + "".join(f"{stats[dtype][c][1]:>10.4f}" for c in cols))
    diff = {c: stats["bfloat16"][c][0] - stats["float32"][c][0] for c in cols}
    print(f"{'bf16 - f32 (means)':<22}" + "".join(f"{diff[c]:>+10.4f}" for c in cols))
    for seed in seeds:
        print(f"{f'bf16 - f32 seed {seed}':<22}" + "".join(
            f"{rows[seed, 'bfloat16'][c] - rows[seed, 'float32'][c]:>+10.4f}" for c in cols))
    print(f"{'|diff| / f32 spread':<22}" + "".join(
        f"{abs(diff[c]) / max(stats['float32'][c][1], 1e-12):>10.2f}" for c in cols))
    same = all(abs(diff[c]) <= stats["float32"][c][1] for c in cols)
    print(f"\nbfloat16 moments {'train the same' if same else 'do NOT train the same'}: the "
          "difference of means is " + ("within" if same else "outside")
          + " the float32 seed-to-seed spread" + ("" if same else " in at least one column"))


if __name__ == "__main__":
    main()
