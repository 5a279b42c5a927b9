"""Exact resume after SIGTERM and after SIGKILL, and restoring onto a different mesh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import micro_config, sigterm_at, synthetic_store

from mla_moe.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(str(tmp_path_factory.mktemp("data") / "store"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, store):
    workdir = str(tmp_path_factory.mktemp("straight") / "w")
    result = train(micro_config(store, train=dict(steps=STEPS)), workdir)
    assert result.step == STEPS and result.resumed_from is None
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return workdir, losses


def test_sigterm_then_resume_is_bitwise_identical(straight, store, tmp_path):
    workdir = str(tmp_path / "w")
    config = micro_config(store, train=dict(steps=STEPS))
    first = train(config, workdir, hooks=(sigterm_at(STEPS // 2),))
    assert first.preempted and first.step == STEPS // 2
    assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))  # saved on the signal
    second = train(config, workdir)
    assert second.resumed_from == STEPS // 2 and second.step == STEPS
    assert _losses(workdir) == straight[1]  # every step, bitwise


def test_sigkill_then_resume_is_bitwise_identical(straight, store, tmp_path):
    workdir = str(tmp_path / "w")
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py:micro",
           f"--workdir={workdir}", f"--config.data.path={store}",
           f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=2",
           "--config.log.tensorboard=False"]
    path = os.pathsep.join(["src", ".", os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            # Save 4 has started: save 2 is complete (Orbax finishes one save before the next);
            # save 4 may be half-written when the kill lands.
            if line.startswith("saved checkpoint step 4") or time.time() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines[-20:])
    assert any(line.startswith("saved checkpoint step 4") for line in lines), "".join(lines[-20:])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resumed = [ln for ln in out.stdout.splitlines() if ln.startswith("resuming from step")]
    assert resumed and resumed[0].split()[3] in ("2", "4"), out.stdout[-2000:]
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert _losses(workdir) == straight[1]


def test_restore_onto_another_mesh_and_continue(straight, store, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    for step in os.listdir(os.path.join(workdir, "checkpoints")):
        if step.isdigit() and int(step) > 4:
            shutil.rmtree(os.path.join(workdir, "checkpoints", step))
    config = micro_config(store, train=dict(steps=STEPS), mesh=dict(data=2, expert=4))
    result = train(config, workdir)  # saved under data=8, restored into data=2 x expert=4
    assert result.resumed_from == 4 and result.step == STEPS
    losses = _losses(workdir)
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(losses[step], straight[1][step], rtol=1e-5, err_msg=str(step))
