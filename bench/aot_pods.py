"""Will each preset fit its pod? Compiles the train step of every row below with
`launch.compile` (one process per row, from this CPU host) and writes a table to
bench/RESULTS.md: preset x target x mesh x tokens per chip x per-chip peak x fits x compile
time x collective bytes.

    python bench/aot_pods.py                      # every row (V3 rows take minutes each)
    python bench/aot_pods.py --rows v2_lite_tpu --no-write
    python bench/aot_pods.py --set model.attention_impl=xla   # an override for every row

Each row's report is kept in bench/aot_pods.json as soon as it is compiled, and the table is
made of this run's rows plus the kept rows compiled with the same `--set` overrides: the V3
rows can be compiled one at a time.

Rows use the presets' own settings (attention_impl=auto: the Pallas kernels on TPU and GPU;
their remat policy); only the mesh and the batch are set per row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
# Every row's last report, so that rows compiled in separate runs make one table.
REPORTS = os.path.join(ROOT, "bench", "aot_pods.json")
TITLE = "## Will it fit? (`python bench/aot_pods.py`, ahead-of-time compiles from a CPU host)"

# name: (preset, target, mesh, sequences per chip, seq_len, HBM fraction the peak must stay under)
ROWS = {
    "v2_lite_tpu": ("deepseek_v2_lite", "tpu:v5p:2x2x1", dict(fsdp=2, expert=2), 4, 4096, 1.0),
    "v2_lite_h100": ("deepseek_v2_lite", "gpu:h100:1x1x8", dict(fsdp=4, expert=2), 4, 4096,
                     1.0),
    "v2_tpu": ("deepseek_v2", "tpu:v5p:4x4x8", dict(fsdp=16, expert=8), 2, 4096, 1.0),
    "v3_tpu": ("deepseek_v3", "tpu:v5p:8x8x8", dict(fsdp=64, expert=8), 2, 4096, 0.9),
    "v3_h200": ("deepseek_v3", "gpu:h200:1x32x8", dict(fsdp=32, expert=8), 1, 4096, 1.0),
    # The most whole sequences of 4096 per v5p chip that V3 fits (under HBM, not under 90%;
    # 5 x 4096 needs 113.4 GiB, 6 x 4096 111.5 GiB, 8 x 4096 112.3 GiB).
    "v3_tpu_max": ("deepseek_v3", "tpu:v5p:8x8x8", dict(fsdp=64, expert=8), 4, 4096, 1.0),
}


def chips(target: str) -> int:
    n = 1
    for d in target.split(":")[2].split("x"):
        n *= int(d)
    return n


def run_row(name: str, overrides: list[str], timeout: int) -> dict:
    preset, target, mesh, per_chip, seq_len, _ = ROWS[name]
    batch = per_chip * chips(target)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "launch.compile", f"--config=configs/{preset}.py",
               f"--target={target}", f"--json={out}", "--config.mesh.data=1",
               f"--config.train.batch_size={batch}", f"--config.train.seq_len={seq_len}",
               *[f"--config.mesh.{a}={n}" for a, n in mesh.items()],
               *[f"--config.{o}" for o in overrides]]
        print(" ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        print(proc.stdout, flush=True)
        if not os.path.exists(out):
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            return dict(name=name, error=tail[0][:200])
        with open(out) as f:
            report = json.load(f)
        report.pop("out_of_memory", None)  # the compiler's full message: long
        return dict(name=name, overrides=overrides, **report)


def load_reports() -> dict:
    if not os.path.exists(REPORTS):
        return {}
    with open(REPORTS) as f:
        return json.load(f)


def table(results: list[dict], overrides: list[str]) -> str:
    g = 2**30
    lines = [
        TITLE, "",
        "Per chip: state = parameters + optimizer state (f32 master weights, two Adam "
        "moments); peak = arguments + unaliased outputs + temporaries as the compiler assigns "
        "them. Collective GiB: the bytes per chip of every all-gather, reduce-scatter, "
        "all-reduce, all-to-all and collective-permute run in one step (ops in the layer scan "
        "counted once per layer); a ragged all-to-all (the MoE dispatch and combine) counts "
        "the smaller of its input and its receive buffer, an upper bound on what it sends, "
        "exact for a balanced routing, not the receive buffer sized for the worst case. "
        "Compile times on a 2-core host. The last V3 row is the most whole 4096-token "
        "sequences per v5p chip found to compile within HBM. Near the limit the compiler's "
        "peak stops growing with the tokens (V3: 93.0 GiB at 3 x 4096, 90.0 GiB at 4 x 4096): "
        "it schedules (and may rematerialise) to fit the HBM it is given, so such a row leaves "
        "no margin and may run slower per token than its FLOPs say."
        + (f" Overrides for every row: `{' '.join(overrides)}`." if overrides else ""), "",
        "| preset | target | mesh | tokens/chip | state GiB | peak GiB | HBM GiB | peak/HBM "
        "| fits | compile s | collective GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        preset, target, mesh, per_chip, seq_len, limit = ROWS[r["name"]]
        mesh_s = " x ".join(f"{a}={n}" for a, n in mesh.items())
        head = f"| {preset} | {target} | {mesh_s} | {per_chip} x {seq_len} "
        if "error" in r:
            lines.append(head + f"| error: {r['error']} | | | | | | |")
            continue
        frac = r["per_device_bytes"] / r["hbm_bytes"]
        fits = "yes" if r["fits"] and frac <= limit else "**no**"
        if limit < 1:
            fits += f" (limit {limit:.0%})"
        coll = sum(row["bytes"] for row in r["collectives"].values()) / g
        lines.append(head + f"| {r['state_bytes'] / g:.1f} | {r['per_device_bytes'] / g:.1f} "
                     f"| {r['hbm_bytes'] / g:.1f} | {frac:.0%} | {fits} "
                     f"| {r['compile_s']:.0f} | {coll:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replaces this bench's section of RESULTS.md (or appends it); other sections stay."""
    with open(RESULTS) as f:
        text = f.read()
    start = text.find(TITLE)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(TITLE))
        rest = "" if end < 0 else "\n" + text[end + 1:]  # the sections after this one
        text = text[:start] + section + rest
    with open(RESULTS, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="config overrides for every row, e.g. model.attention_impl=xla")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    saved = {} if args.no_write else load_reports()
    fresh = {}
    for name in args.rows:
        fresh[name] = run_row(name, args.set, args.timeout)
        if not args.no_write:  # keep each row as soon as it is compiled
            with open(REPORTS, "w") as f:
                json.dump({**saved, **fresh}, f, indent=1)
    # This run's rows, plus the rows that earlier runs compiled with the same overrides.
    saved = {n: r for n, r in saved.items() if r.get("overrides", []) == args.set}
    reports = {**saved, **fresh}
    results = [reports[n] for n in ROWS if n in reports]
    section = table(results, args.set)
    print(section)
    if not args.no_write:
        write_section(section)


if __name__ == "__main__":
    main()
