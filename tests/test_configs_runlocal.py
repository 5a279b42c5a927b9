"""Every published preset has a `runlocal` variant: the same model at toy sizes, which trains
on a CPU (what the full-size run would do, short of its memory) and learns: its loss falls."""

import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = ["deepseek_v2_lite", "deepseek_v2", "deepseek_v3", "deepseek_v32"]


def _configs(name):
    module = importlib.import_module(f"configs.{name}")
    return module, module.get_config(), module.get_config("runlocal")


@pytest.mark.parametrize("name", PRESETS)
def test_runlocal_is_the_published_model_shrunk(name):
    module, published, local = _configs(name)
    shrunk = set(module.RUNLOCAL_SIZES)
    assert shrunk <= set(published.model)
    same = {k: v for k, v in published.model.items() if k not in shrunk}
    assert {k: local.model[k] for k in same} == same  # routing, scoring, YARN, MTP, remat...
    assert set(local.model) == set(published.model)
    # The q LoRA shrinks where the preset has one and stays absent where it does not.
    assert (local.model.q_lora_rank is None) == (published.model.q_lora_rank is None)
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        module.get_config("huge")
    # A longer run of it (the README's 300-step V3.2 walk-through) logs a line per 10 steps
    # and saves every 50, not every step and every other.
    assert (local.log.every_steps, local.checkpoint.every_steps) == (10, 50)


STEPS = 12  # the preset's two and ten more, each well under a second once compiled


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_runlocal_loss_falls(name, tmp_path):
    """The preset's run as a user starts it (`launch.train --config=configs/NAME.py:runlocal`,
    on 8 CPU devices, compiled quickly), 12 steps (one checkpoint, at the end), every step
    logged: every loss finite, and the mean of the last four below the first (the untrained
    model's) by more than 3 standard deviations of that difference's noise. The noise is the
    run's own: each step's loss is on a fresh batch, so consecutive losses differ by sqrt(2)
    sigma of batch noise (plus the trend, which only makes sigma larger); first - mean(last 4)
    has sigma sqrt(1 + 1/4)."""
    workdir = str(tmp_path / "w")
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(["src", ".", os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "launch.train", f"--config=configs/{name}.py:runlocal",
         f"--workdir={workdir}", f"--config.train.steps={STEPS}",
         f"--config.checkpoint.every_steps={STEPS}", "--config.log.every_steps=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]  # 0: not preempted
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), out.stdout[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(STEPS)]
    losses = [r["loss"] for r in records]
    assert all(map(math.isfinite, losses)), losses
    sigma = np.std(np.diff(losses), ddof=1) / np.sqrt(2)
    fall = losses[0] - np.mean(losses[-4:])
    # (measured: falls of 0.4-0.5 nats from ln(256) = 5.55, sigma ~0.04)
    assert fall > 3 * sigma * np.sqrt(1 + 1 / 4), (fall, sigma, losses)
