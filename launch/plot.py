"""A training run's curves as one PNG, from its `metrics.jsonl`: no browser, no TensorBoard.

    python -m launch.plot --workdir=/tmp/mla_moe_tiny              # -> WORKDIR/metrics.png
    python -m launch.plot --workdir=gs://bucket/run --output=run.png

Three panels over the logged steps: the training loss with the validation loss, the learning
rate, and each MoE layer's expert load (the busiest expert's share of tokens over the mean
share: 1 is perfect balance). Needs matplotlib, the `plot` extra: pip install -e '.[plot]'.
"""

from __future__ import annotations

import io
import json

from absl import flags

from launch import cli
from mla_moe.errors import InputError, MissingInputError

# Checked in main, not marked required: a flag marked required is validated by every parse of
# the process's flags, which breaks other launchers imported beside this one (the tests).
_WORKDIR = flags.DEFINE_string("workdir", "", "The training run's --workdir (required).")
_OUTPUT = flags.DEFINE_string("output", "", "The PNG to write (default: WORKDIR/metrics.png).")


def load_rows(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl, one per logged step (a step logged twice, by a run
    resumed from an earlier checkpoint, keeps its last row), in step order."""
    from mla_moe import paths

    path = paths.resolve(workdir) / "metrics.jsonl"
    if not path.exists():
        raise MissingInputError(f"--workdir={workdir!r} has no metrics.jsonl; pass the --workdir "
                                "of a training run that has logged a step")
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    if not by_step:
        raise InputError(f"--workdir={workdir!r}: metrics.jsonl has no rows yet")
    return [by_step[s] for s in sorted(by_step)]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that hold `key`."""
    held = [r for r in rows if key in r]
    return [r["step"] for r in held], [r[key] for r in held]


def expert_load(rows: list[dict]) -> dict[int, tuple[list[int], list[float]]]:
    """{MoE layer: (steps, busiest expert's load over the mean load)}, from the rows'
    `expert_load_max/i` and `expert_load_mean/i`."""
    out = {}
    i = 0
    while any(f"expert_load_max/{i}" in r for r in rows):
        held = [r for r in rows if f"expert_load_max/{i}" in r and f"expert_load_mean/{i}" in r]
        out[i] = ([r["step"] for r in held], [r[f"expert_load_max/{i}"] /
                                              max(r[f"expert_load_mean/{i}"], 1e-9) for r in held])
        i += 1
    return out


def figure(rows: list[dict], title: str):
    """The three panels as a matplotlib Figure (no pyplot: no display is needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 9), layout="constrained")
    loss_ax, lr_ax, load_ax = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title)
    loss_ax.plot(*series(rows, "loss"), label="training loss")
    steps, val = series(rows, "val_loss")
    if steps:
        loss_ax.plot(steps, val, "o-", label="validation loss")
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.legend()
    lr_ax.plot(*series(rows, "lr"))
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    loads = expert_load(rows)
    for layer, (steps, ratio) in loads.items():
        load_ax.plot(steps, ratio, label=f"MoE layer {layer}")
    if loads:
        load_ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        load_ax.legend(fontsize="small", ncols=min(len(loads), 4))
    load_ax.set_ylabel("expert load max / mean")
    load_ax.set_xlabel("step")
    for ax in (loss_ax, lr_ax, load_ax):
        ax.grid(alpha=0.3)
    return fig


def main(argv: list[str]) -> None:
    """Writes the PNG of the run's curves and says where."""
    if not _WORKDIR.value:
        raise InputError("--workdir is required: the training run's workdir")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("launch.plot needs matplotlib; install the plot extra: "
                         "pip install -e '.[plot]'") from None
    from mla_moe import paths

    workdir = _WORKDIR.value
    if not workdir:
        raise InputError("--workdir is empty; pass the --workdir of a training run")
    rows = load_rows(workdir)
    out = _OUTPUT.value or str(paths.resolve(workdir) / "metrics.png")
    png = io.BytesIO()
    figure(rows, title=workdir).savefig(png, format="png", dpi=100)
    paths.resolve(out).write_bytes(png.getvalue())
    print(f"wrote {out} ({len(rows)} logged steps, {rows[0]['step']} to {rows[-1]['step']})")


if __name__ == "__main__":
    cli.run(main)
