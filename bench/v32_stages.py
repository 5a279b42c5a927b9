"""V3.2's two training stages on a CPU: the README's walk-through, run and summarised.

    python bench/v32_stages.py [--workdir=DIR] [--lm_steps=300] [--warmup_steps=100]
                               [--sparse_steps=50]

Runs the README's five commands as a user does (`launch.train` and `launch.convert`
subprocesses on `configs/deepseek_v32.py:runlocal` / `:runlocal_warmup`): an LM with the
indexer off, its export, the dense warm-up of the indexers from that export, its export, and
the sparse stage from it. Prints from each run's metrics.jsonl: the LM's loss and validation
loss; the warm-up's indexer KL and gradient norm (the indexers' only) per logged step, and
the range of its CE (the main model is frozen, so CE moves only with the batch); the sparse
stage's validation loss at its start and end and the range of its KL.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP_STEPS_SHOWN = (10, 20, 30, 50, 70, 90, 100)


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", *args]
    print("$ python -m " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def records(workdir: str) -> dict[int, dict]:
    """{step: merged record} from a run's metrics.jsonl (train and validation rows)."""
    out: dict[int, dict] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            out.setdefault(r["step"], {}).update(r)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mla_moe_dsa"))
    ap.add_argument("--lm_steps", type=int, default=300)
    ap.add_argument("--warmup_steps", type=int, default=100)
    ap.add_argument("--sparse_steps", type=int, default=50)
    args = ap.parse_args()
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    cfg = "--config=configs/deepseek_v32.py"
    run("launch.train", f"{cfg}:runlocal", f"--workdir={w}/lm", "--config.train.dsa_stage=off",
        f"--config.train.steps={args.lm_steps}")
    run("launch.convert", f"--checkpoint={w}/lm", f"--output={w}/lm_hf")
    run("launch.train", f"{cfg}:runlocal_warmup", f"--workdir={w}/warmup",
        f"--init_from_hf={w}/lm_hf", f"--config.train.steps={args.warmup_steps}")
    run("launch.convert", f"--checkpoint={w}/warmup", f"--output={w}/warmup_hf")
    run("launch.train", f"{cfg}:runlocal", f"--workdir={w}/sparse",
        f"--init_from_hf={w}/warmup_hf", f"--config.train.steps={args.sparse_steps}")

    lm, warm, sparse = (records(os.path.join(w, d)) for d in ("lm", "warmup", "sparse"))
    print(f"\n{datetime.date.today()} | {platform.processor() or platform.machine()}")
    val = [r["val_loss"] for _, r in sorted(lm.items()) if "val_loss" in r]
    print(f"LM ({args.lm_steps} steps, indexer off): loss "
          + ", ".join(f"{lm[s]['loss']:.2f} at step {s}" for s in (50, args.lm_steps) if s in lm)
          + (f"; val {val[-1]:.2f}" if val else ""))
    shown = [s for s in WARMUP_STEPS_SHOWN if s in warm and "indexer_loss" in warm[s]]
    print("\n| warm-up step | " + " | ".join(str(s) for s in shown) + " |")
    print("|---|" + "---|" * len(shown))
    print("| indexer KL (mean over tokens and layers) | "
          + " | ".join(f"{warm[s]['indexer_loss']:.2g}" for s in shown) + " |")
    print("| grad norm (the indexers' only) | "
          + " | ".join(f"{warm[s]['grad_norm']:.2g}" for s in shown) + " |")
    ce = [r["loss"] for r in warm.values() if "loss" in r]
    print(f"\nwarm-up CE range {min(ce):.2f}-{max(ce):.2f} (the main model is frozen)")
    sval = [r["val_loss"] for _, r in sorted(sparse.items()) if "val_loss" in r]
    kl = [r["indexer_loss"] for r in sparse.values() if "indexer_loss" in r]
    print(f"sparse ({args.sparse_steps} steps): val "
          + (" -> ".join(f"{v:.2f}" for v in (sval[0], sval[-1])) if sval else "n/a")
          + (f", KL {min(kl):.2g}-{max(kl):.2g}" if kl else ""))


if __name__ == "__main__":
    main()
