"""Will each preset fit its pod? Compiles the train step of every row below with
`launch.compile` (one process per row, from this CPU host) and writes a table to
bench/RESULTS.md: preset x target x mesh x tokens per chip x per-chip peak x host memory x
fits x dropless x the roofline estimate x compile time x collective bytes.

    python bench/aot_pods.py                      # every row (V3 rows take minutes each)
    python bench/aot_pods.py --rows v2_lite_tpu4 --no-write
    python bench/aot_pods.py --set model.remat_policy=full   # an override for every row

Each row's report is kept in bench/aot_pods.json as soon as it is compiled, and the table is
made of this run's rows plus the kept rows compiled with the same `--set` overrides: the V3
rows can be compiled one at a time.

Rows use the presets' own settings (mesh, remat policy, dispatch, dtypes, attention_impl=auto:
the Pallas kernels on TPU and GPU); only the target, the batch and the sequence length are set
per row.
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

# name: (preset[:variant], target, sequences per chip, seq_len, HBM fraction the peak must
# stay under[, config overrides]). Every row runs the preset's own defaults (mesh, remat,
# dispatch, dtypes): only the target, the batch and the sequence length are given, as a user
# would, plus the context size where a sequence is split over chips.
ROWS = {
    "v3_tpu_6x8192": ("deepseek_v3", "tpu:v5p:8x8x8", 6, 8192, 0.9),
    "v3_tpu_4x4096": ("deepseek_v3", "tpu:v5p:8x8x8", 4, 4096, 0.9),
    "v2_lite_tpu8": ("deepseek_v2_lite", "tpu:v5p:2x2x2", 12, 4096, 0.9),
    "v2_lite_tpu4": ("deepseek_v2_lite", "tpu:v5p:2x2x1", 24, 2048, 0.9),
    "v2_tpu": ("deepseek_v2", "tpu:v5p:4x4x8", 4, 4096, 0.9),
    "v3_h200": ("deepseek_v3", "gpu:h200:1x32x8", 4, 4096, 0.9),
    "v2_lite_h100": ("deepseek_v2_lite", "gpu:h100:1x1x8", 4, 4096, 0.9),
    # Ironwood: two compile-only devices per chip (one per TensorCore die).
    "v2_lite_tpu7x": ("deepseek_v2_lite", "tpu:tpu7x:2x2x1", 12, 4096, 0.9),
    # V3 on 256 Ironwood chips (512 devices, as many as v5p:8x8x8): MaxText's v5p batch per
    # device, 6 x 8192 (12 x 8192 per chip), and 4 x 8192 per device. Under the compiler's
    # 70 GiB budget (mla_moe.train.tpu_flags) the second fits and the first does not
    # (bench/RESULTS.md, "Ironwood (TPU7x), compile-only").
    "v3_tpu7x_12x8192": ("deepseek_v3", "tpu:tpu7x:4x8x8", 12, 8192, 0.9),
    "v3_tpu7x": ("deepseek_v3", "tpu:tpu7x:4x8x8", 8, 8192, 0.9),
    # 128K-token sequences, each split over `context` chips (a fraction of a sequence per
    # chip): V3.2's sparse stage and V3 at 128 x 131072 (32,768 tokens per chip, 4 chips per
    # sequence), and V3.2's dense warm-up at the report's 16 x 131072 (context 32).
    "v32_tpu_128x128k": ("deepseek_v32", "tpu:v5p:8x8x8", 1 / 4, 131072, 0.9,
                         ("mesh.context=4",)),
    "v32_warmup_tpu_16x128k": ("deepseek_v32:warmup", "tpu:v5p:8x8x8", 1 / 32, 131072, 0.9,
                               ("mesh.context=32",)),
    "v3_tpu_128x128k": ("deepseek_v3", "tpu:v5p:8x8x8", 1 / 4, 131072, 0.9,
                        ("mesh.context=4",)),
}


def row(name: str) -> tuple:
    """(preset[:variant], target, sequences per chip, seq_len, HBM fraction, overrides)."""
    preset, target, per_chip, seq_len, limit, *extra = ROWS[name]
    return preset, target, per_chip, seq_len, limit, tuple(extra[0]) if extra else ()


def per_chip_text(per_chip: float, seq_len: int) -> str:
    """"6 x 8192", or for a sequence split over chips "32,768 (1/4 of 131072)"."""
    if per_chip >= 1:
        return f"{per_chip:g} x {seq_len}"
    return f"{per_chip * seq_len:,.0f} (1/{round(1 / per_chip)} of {seq_len})"


def chips(target: str) -> int:
    n = 1
    for d in target.split(":")[2].split("x"):
        n *= int(d)
    return n


def run_row(name: str, overrides: list[str], timeout: int) -> dict:
    preset, target, per_chip, seq_len, _, row_overrides = row(name)
    batch = round(per_chip * chips(target))
    module, _, variant = preset.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "launch.compile",
               f"--config=configs/{module}.py" + (f":{variant}" if variant else ""),
               f"--target={target}", f"--json={out}",
               f"--config.train.batch_size={batch}", f"--config.train.seq_len={seq_len}",
               *[f"--config.{o}" for o in (*row_overrides, *overrides)]]
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
        "Each row is `launch.compile` with the preset's own defaults; only `--target`, "
        "`--config.train.batch_size` and `--config.train.seq_len` are given. Per chip: state = "
        "parameters + optimizer state (f32 master weights; the presets keep both Adam moments "
        "in bf16); peak = arguments "
        "+ unaliased outputs + temporaries as the compiler assigns them; host = what the step "
        "keeps in the host's memory per chip (the offloaded layer inputs), against the host's "
        "RAM per chip. Dropless: no token can be dropped by construction. Collective GiB: what "
        "each device receives over links in one step, from every all-gather, reduce-scatter, "
        "all-reduce, all-to-all and collective-permute, loop iterations counted "
        "(`mla_moe.train.hlo_collectives`' convention; rows compiled before 2026-12-07 counted "
        "each collective's full array instead). Step bound and MFU bound: "
        "the roofline estimate, a lower bound on the step time (and an upper bound on MFU) "
        "from the compiler's counts and the chip's published rates, not a measurement; "
        "`bound by` names its largest term. On tpu7x (Ironwood) the compiler's device is one "
        "TensorCore die, two per chip: tokens are per chip, state, peak and HBM per device "
        "(94.75 GiB, half the chip's 192 GB). Compile times on a shared 2-core host."
        + (f" Overrides for every row: `{' '.join(overrides)}`." if overrides else ""), "",
        "| preset | target | mesh | tokens/chip | state GiB | peak GiB | peak/HBM | host GiB "
        "| fits | dropless | step bound s | MFU bound | bound by | compile s | collective GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    terms = ("compute_s", "hbm_s", "ici_s", "dcn_s", "host_s")
    for r in results:
        preset, target, per_chip, seq_len, limit, _ = row(r["name"])
        head = f"| {preset} | {target} "
        tokens = per_chip_text(per_chip, seq_len)
        if "error" in r:
            lines.append(head + f"| | {tokens} | error: {r['error']} "
                         + "| " * 10 + "|")
            continue
        mesh_s = " x ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1)
        # Rows kept from before the field's rename name the capacity `hbm_bytes`.
        r.setdefault("hbm_capacity_bytes", r.get("hbm_bytes", 0))
        if r.get("limit_exceeded") and not r.get("temp_bytes"):
            # The compiler refused the program: its message gives only what it needed against
            # the budget it had (the capacity is then that budget, not the device's HBM).
            lines.append(head + f"| {mesh_s} | {tokens} "
                         f"| {r['state_bytes'] / g:.1f} | needs {r['per_device_bytes'] / g:.1f} "
                         f"of the compiler's {r['hbm_capacity_bytes'] / g:.1f} | - | - | **no** "
                         f"| {'yes' if r.get('dropless') else '**no**'} | | | "
                         f"| {r['compile_s']:.0f} | - |")
            continue
        frac = r["per_device_bytes"] / r["hbm_capacity_bytes"]
        fits = "yes" if r["fits"] and frac <= limit else "**no**"
        if limit < 1:
            fits += f" ({limit:.0%})"
        host = r.get("host_bytes", 0) / g
        ram = r.get("host_ram_bytes", 0) / g
        host_s = f"{host:.1f} of {ram:.0f}" if ram else f"{host:.1f}"
        est = r.get("estimate") or {}
        if est:
            worst = max((t for t in terms if est.get(t) is not None), key=lambda t: est[t])
            est_s = (f"{est['step_s_lower_bound']:.2f} | {est['mfu_upper_bound']:.2f} "
                     f"| {worst.removesuffix('_s')}")
        else:
            est_s = "| |"
        coll = sum(row["bytes"] for row in r["collectives"].values()) / g
        dropless = "yes" if r.get("dropless") else "**no**"
        lines.append(head + f"| {mesh_s} | {tokens} | {r['state_bytes'] / g:.1f} "
                     f"| {r['per_device_bytes'] / g:.1f} | {frac:.0%} | {host_s} | {fits} "
                     f"| {dropless} | {est_s} | {r['compile_s']:.0f} | {coll:.1f} |")
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
