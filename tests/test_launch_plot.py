"""launch.plot: a workdir's metrics.jsonl as one PNG (loss and validation loss, learning rate,
each MoE layer's expert load), and one line naming the extra when matplotlib is missing."""

import json
import sys

import pytest
from absl import flags

from launch import plot
from mla_moe.errors import InputError

# As train writes them: every logged step, validation every other; step 20 logged twice (a
# run resumed from step 10 wrote it again).
ROWS = [
    {"step": 10, "time": 1.0, "loss": 5.0, "lr": 1e-3, "expert_load_max/0": 400.0,
     "expert_load_mean/0": 100.0, "expert_load_max/1": 200.0, "expert_load_mean/1": 100.0},
    {"step": 20, "time": 2.0, "loss": 9.9, "lr": 2e-3, "val_loss": 9.9,
     "expert_load_max/0": 300.0, "expert_load_mean/0": 100.0, "expert_load_max/1": 150.0,
     "expert_load_mean/1": 100.0},
    {"step": 20, "time": 3.0, "loss": 4.0, "lr": 2e-3, "val_loss": 4.5,
     "expert_load_max/0": 200.0, "expert_load_mean/0": 100.0, "expert_load_max/1": 120.0,
     "expert_load_mean/1": 100.0},
    {"step": 30, "time": 4.0, "loss": 3.0, "lr": 1e-3, "expert_load_max/0": 150.0,
     "expert_load_mean/0": 100.0, "expert_load_max/1": 110.0, "expert_load_mean/1": 100.0},
]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def _parse(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["plot", *args])


def test_curves_from_the_rows(workdir):
    rows = plot.load_rows(str(workdir))
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[1]["loss"] == 4.0
    assert plot.series(rows, "val_loss") == ([20], [4.5])
    assert plot.expert_load(rows) == {0: ([10, 20, 30], [4.0, 2.0, 1.5]),
                                      1: ([10, 20, 30], [2.0, 1.2, 1.1])}
    fig = plot.figure(rows, title="run")
    loss_ax, lr_ax, load_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["training loss",
                                                                  "validation loss"]
    assert list(lr_ax.get_lines()[0].get_ydata()) == [1e-3, 2e-3, 1e-3]
    assert len(load_ax.get_lines()) == 3  # two layers and the balance line at 1


def test_main_writes_the_png(workdir, capsys):
    _parse(f"--workdir={workdir}")
    plot.main(["plot"])
    png = (workdir / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert capsys.readouterr().out == (f"wrote {workdir / 'metrics.png'} (3 logged steps, "
                                       "10 to 30)\n")


def test_mistakes_name_the_flag_or_the_extra(workdir, tmp_path_factory, monkeypatch):
    _parse(f"--workdir={tmp_path_factory.mktemp('empty')}")
    with pytest.raises(InputError, match="^--workdir=.* has no metrics.jsonl"):
        plot.main(["plot"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the plot extra
    _parse(f"--workdir={workdir}")
    with pytest.raises(InputError, match=r"install the plot extra: pip install -e '\.\[plot\]'"):
        plot.main(["plot"])
    assert not (workdir / "metrics.png").exists()
