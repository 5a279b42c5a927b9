"""The tiny preset's figures: the quickstart run, its seed spread, and two variants of it.

    python bench/tiny_runs.py [--arms=preset,bf16_moments,v3_balance] [--seeds=0,1,2]
                              [--steps=150] [--workdir=DIR]

Trains configs/tiny.py (the README quickstart run: 150 steps on the bundled corpus, every
device of this host on the data axis, as `launch.train` does) once per arm and seed:
- `preset`: the preset as it is (seed 0 is the quickstart command's run);
- `bf16_moments`: bfloat16 Adam moments (`train.moment_dtype`);
- `v3_balance`: V3's own balancing settings (bias moved 0.001 a step, sequence-wise loss
  weight 1e-4) in place of the preset's 0.003 and 0.003.
A seed fixes the initialisation and the data order, so the arms of one seed see the same
batches. Prints, per run, the train loss at steps 50/100/150, the final validation loss and
the busiest expert's load over the mean load (max/mean) of each MoE layer at steps 10/50/150;
per arm the mean and spread (max - min) over seeds; per other arm its difference of means
from the preset and whether that lies within the preset's seed-to-seed spread. Results also
go to WORKDIR/results.json.
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

ARMS = {
    "preset": {},
    "bf16_moments": {"train.moment_dtype": "bfloat16"},
    "v3_balance": {"model.expert_bias_update_rate": 0.001, "model.seq_balance_alpha": 1e-4},
}
LOSS_STEPS = (50, 100, 150)
LOAD_STEPS = (10, 50, 150)
COLUMNS = [f"loss@{s}" for s in LOSS_STEPS] + ["val"]


def _finished(workdir: str, steps: int) -> dict | None:
    """{step: record} of a run in `workdir` that reached `steps` and its evaluation, or None."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records: dict[int, dict] = {}
    with open(path) as f:
        for r in map(json.loads, f):
            records.setdefault(r["step"], {}).update(r)
    return records if "val_loss" in records.get(steps, {}) else None


def run_one(arm: str, seed: int, steps: int, workdir: str) -> dict:
    """Trains one run from scratch (or reads the finished run already in `workdir`: an
    interrupted bench resumes at the next run); {column: value} from its metrics.jsonl."""
    records = _finished(workdir, steps)
    if records is not None:
        return _row(records, steps, wall=None)
    config = tiny.get_config()
    config.seed = seed
    config.train.steps = steps
    for key, value in ARMS[arm].items():
        section, field = key.split(".")
        config[section][field] = value
    config.log.tensorboard = False
    config.checkpoint.every_steps = steps  # one save at the end: checkpoints are not measured
    config.checkpoint.max_to_keep = 1
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    train(config, workdir)
    wall = time.perf_counter() - t0
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    return _row(_finished(workdir, steps), steps, wall)


def _row(records: dict[int, dict], steps: int, wall: float | None) -> dict:
    row = {f"loss@{s}": records[s]["loss"] for s in LOSS_STEPS if s in records}
    row["val"] = records[steps]["val_loss"]
    for s in LOAD_STEPS:
        r = records.get(s, {})
        layers = sorted(int(k.split("/")[1]) for k in r if k.startswith("expert_load_max/"))
        row[f"load@{s}"] = [r[f"expert_load_max/{i}"] / r[f"expert_load_mean/{i}"]
                            for i in layers]
    row["wall_s"] = wall
    return row


def _mean(xs):
    return sum(xs) / len(xs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="runs go seed by seed, each seed's arms in this order")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "mla_moe_tiny_runs"))
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "preset" not in arms:
        parser.error(f"--arms: unknown {unknown} (known: {list(ARMS)}); 'preset' is required")
    seeds = [int(s) for s in args.seeds.split(",")]
    enable_compilation_cache(os.path.join("~", ".cache", "mla_moe", "jax"))
    os.makedirs(args.workdir, exist_ok=True)

    rows = {}  # (arm, seed) -> row
    for seed in seeds:
        for arm in arms:  # the arms of a seed back to back: a partial log stays paired
            row = run_one(arm, seed, args.steps, os.path.join(args.workdir, f"{arm}_{seed}"))
            rows[arm, seed] = row
            print(f"{arm} seed {seed}: " + " ".join(f"{c} {row[c]:.4f}" for c in COLUMNS
                                                     if c in row)
                  + (f" ({row['wall_s']:.0f} s)" if row["wall_s"] else " (kept run)"), flush=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump([dict(arm=a, seed=s, **r) for (a, s), r in rows.items()], f, indent=1)

    cols = [c for c in COLUMNS if all(c in r for r in rows.values())]
    print(f"\n{datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) | jax {jax.__version__} "
          f"| configs/tiny.py, {args.steps} steps, seeds {args.seeds}")
    print(f"{'run':<24}" + "".join(f"{c:>10}" for c in cols))
    for (arm, seed), r in rows.items():
        print(f"{f'{arm} seed {seed}':<24}" + "".join(f"{r[c]:>10.4f}" for c in cols))
    stats = {}
    for arm in arms:
        vals = {c: [rows[arm, s][c] for s in seeds] for c in cols}
        stats[arm] = {c: (_mean(v), max(v) - min(v)) for c, v in vals.items()}
        print(f"{f'{arm} mean':<24}" + "".join(f"{stats[arm][c][0]:>10.4f}" for c in cols))
        print(f"{f'{arm} spread':<24}" + "".join(f"{stats[arm][c][1]:>10.4f}" for c in cols))
    for arm in arms:
        if arm == "preset":
            continue
        diff = {c: stats[arm][c][0] - stats["preset"][c][0] for c in cols}
        print(f"{f'{arm} - preset':<24}" + "".join(f"{diff[c]:>+10.4f}" for c in cols))
        same = all(abs(diff[c]) <= stats["preset"][c][1] for c in cols)
        print(f"  {arm}: the difference of means is {'within' if same else 'outside'} the "
              "preset's seed-to-seed spread" + ("" if same else " in at least one column"))

    print("\nexpert load max/mean per MoE layer")
    print(f"{'run':<24}" + "".join(f"{f'step {s}':>24}" for s in LOAD_STEPS))
    for (arm, seed), r in rows.items():
        cells = [" ".join(f"{x:.2f}" for x in r[f"load@{s}"]) for s in LOAD_STEPS]
        print(f"{f'{arm} seed {seed}':<24}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
