"""The roofline lower bound of any compiled program, from its optimized HLO text, read exactly
as `launch.compile` reads our own step (`mla_moe.train.hlo_bound`).

    python bench/hlo_bound.py --hlo=step.hlo.txt.gz --target=tpu:v5p:8x8x8 \
        --flops=1.382e16 --json=/tmp/bound.json
    python -m launch.compile ... --hlo=/tmp/ours.hlo.txt.gz   # our own step's text

`--flops` is the model FLOPs per device per step (for MaxText's programs, its own count, in
../shared/data/maxtext/README.md). Prints and writes: HBM traffic per step (a lower bound:
HBM-resident operands and results, loop bodies once per iteration), collective bytes per kind
(received over links) and in total, the Pallas kernels' operands and results (left out of the
bound: what a kernel touches depends on its grid and data), and the `estimate` block with its
compute, HBM, ICI, DCN and host terms. `--compare NAME=FILE ...` prints several programs side
by side instead, as markdown (as bench/RESULTS.md quotes it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src"), ROOT]

from mla_moe.train import hlo_bound, hlo_collectives, hlo_traffic, roofline  # noqa: E402
from mla_moe.train.hlo_text import Module  # noqa: E402
from pallas_kernels import chips, targets  # noqa: E402

GIB = 1 << 30


def read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return f.read()


def measure(path: str, hlo_text: str, module: Module, target: str, flops: float) -> dict:
    """The bound of one saved module for `target` ("tpu:v5p:8x8x8", "gpu:h200:1x32x8")."""
    t = targets.parse_target(target)
    chip = chips.by_target(t.chip)
    per_host = int(t.topology.split("x")[-1]) if t.platform == "gpu" else 0
    bound = hlo_bound.measure(hlo_text, chip=chip, flops_per_device=flops,
                              devices_per_host=per_host, module=module)
    return {"hlo": path, "target": target, "flops_per_device": flops, **bound.to_json()}


_OP_NAME = re.compile(r'op_name="([^"]*)"')
# op_name path components that say how, not what: jit, autodiff and control-flow wrappers.
_WRAPPERS = ("jit(", "jvp(", "transpose(", "checkpoint", "remat", "while", "body", "cond",
             "closed_call", "eval_jaxpr", "shard_map", "pjit", "vmap(")


def op_key(ins, depth: int = 2) -> str:
    """What an instruction computes, from its op_name: "bwd dot_general", "ffn_act/mul"."""
    m = _OP_NAME.search(ins.text)
    if not m:
        return f"<{ins.opcode}>"
    parts = [p for p in m.group(1).split("/") if not p.startswith(_WRAPPERS)]
    return ("bwd " if "transpose(" in m.group(1) else "") + "/".join(parts[:depth])


def top(hlo_text: str, module: Module, n: int) -> str:
    """The `n` largest shares of a program's HBM traffic, by what the instructions compute."""
    parts = hlo_traffic.breakdown(hlo_text, op_key, module=module)
    total = sum(parts.values())
    lines = [f"  HBM traffic by op_name (of {total / GIB:,.0f} GiB):"]
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"    {v / GIB:>10,.1f} GiB {100 * v / total:5.1f}%  {k}")
    return "\n".join(lines)


def text(name: str, r: dict) -> str:
    est = r["estimate"]
    lines = [f"{name}: {r['hlo']} on {r['target']} ({r['num_devices']} devices)",
             f"  HBM traffic per step, per device (lower bound): "
             f"{r['hbm_traffic_bytes'] / GIB:,.1f} GiB (loop bodies once: "
             f"{r['hbm_traffic_bytes_once'] / GIB:,.1f} GiB); left out: the Pallas kernels' "
             f"operands and results, {r['kernel_bytes'] / GIB:,.1f} GiB once each",
             "  collectives per step, per device (GiB received over links | full arrays):"]
    for kind, row in r["collectives"].items():
        if row["ops"]:
            lines.append(f"    {kind:<20}{row['count']:>7} runs {row['bytes'] / GIB:>12,.1f}"
                         f" | {row['array_bytes'] / GIB:,.1f}")
    lines.append(f"  ICI {r['ici_bytes'] / GIB:,.1f} GiB, DCN {r['dcn_bytes'] / GIB:,.1f} GiB")
    if est:
        lines.extend("  " + ln for ln in roofline.Estimate(
            **{k: v for k, v in est.items() if k != "kind"}).text())
    return "\n".join(lines)


def table(rows: list[tuple[str, dict]]) -> str:
    kinds = [k for k in hlo_collectives.KINDS
             if any(r["collectives"][k]["ops"] for _, r in rows)]
    head = ("| program | target | HBM traffic GiB | kernels' operands GiB (not in it) | "
            + " | ".join(f"{k} GiB" for k in kinds)
            + " | ICI GiB | DCN GiB | compute s | HBM s | ICI s | DCN s | step >= s | MFU <= |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows:
        est = r["estimate"]
        coll = " | ".join(f"{r['collectives'][k]['bytes'] / GIB:,.0f}" for k in kinds)
        lines.append(
            f"| {name} | {r['target']} | {r['hbm_traffic_bytes'] / GIB:,.0f} "
            f"| {r['kernel_bytes'] / GIB:,.0f} | {coll} "
            f"| {r['ici_bytes'] / GIB:,.0f} | {r['dcn_bytes'] / GIB:,.0f} "
            f"| {est['compute_s']:.2f} | {est['hbm_s']:.2f} | {est['ici_s']:.2f} "
            f"| {est['dcn_s']:.2f} | {est['step_s_lower_bound']:.2f} "
            f"| {est['mfu_upper_bound']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hlo", help="a .hlo.txt or .hlo.txt.gz file")
    ap.add_argument("--target", required=True, help="e.g. tpu:v5p:8x8x8, gpu:h200:1x32x8")
    ap.add_argument("--flops", type=float, required=True,
                    help="model FLOPs per device per step")
    ap.add_argument("--json", default="", help="also write the result as JSON")
    ap.add_argument("--top", type=int, default=0,
                    help="also list the N largest shares of the HBM traffic, by op_name")
    ap.add_argument("--compare", nargs="*", default=[], metavar="NAME=FILE",
                    help="several programs of the same target and FLOPs, as one table")
    args = ap.parse_args()
    named = [c.split("=", 1) for c in args.compare] or [["program", args.hlo]]
    rows = []
    for name, path in named:
        hlo_text = read(path)
        module = Module(hlo_text)  # parsed once, for the bound and the breakdown
        rows.append((name, measure(path, hlo_text, module, args.target, args.flops)))
        print(text(name, rows[-1][1]), flush=True)
        if args.top:
            print(top(hlo_text, module, args.top), flush=True)
    if args.compare:
        print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows[0][1] if len(rows) == 1 else dict(rows), f, indent=1)


if __name__ == "__main__":
    main()
