"""The launchers as a user runs them: `launch.train` end to end on the default corpus,
one-line errors, `launch.prepare_data`, and two processes matching one."""

import glob
import json
import os
import re
import subprocess
import sys
import time

import cli_output
import numpy as np
import pytest
from ports import reserved_port
from train_helpers import micro_config, one_layer, one_layer_flags, synthetic_store, xla_flags

from mla_moe.data.prepare_store import is_validation
from mla_moe.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    path = os.pathsep.join(["src", ".", os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _run(args, timeout=400, **env):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_end_to_end_on_default_corpus(tmp_path):
    workdir = str(tmp_path / "w")
    args = ["launch.train", "--config=configs/tiny.py:micro", f"--workdir={workdir}",
            "--config.train.steps=60", "--config.train.batch_size=16", "--config.train.seq_len=64",
            "--config.train.learning_rate=1e-2", "--config.train.warmup_steps=5",
            "--config.log.every_steps=10", "--config.checkpoint.every_steps=30",
            "--config.train.eval_every_steps=30", "--profile_steps=2:3"]
    out = _run(args, MLA_MOE_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert cli_output.noise(out.stderr) == [], out.stderr[-3000:]  # no plugin start-up notices
    entropy = float(re.search(r"unigram entropy ([\d.]+) nats", out.stdout).group(1))
    assert 2.5 < entropy < 4.5  # Python source, byte tokens
    progress = [ln for ln in out.stdout.splitlines() if ln.startswith("step ")]
    assert len(progress) == 6 and "tok/s" in progress[-1] and "MFU" in progress[-1]
    assert re.search(r" \| [\dhms]+ elapsed \| ETA [\dhms]+$", progress[-2]), progress[-2]
    assert progress[-1].endswith(" elapsed")  # and no ETA at the last step
    compiling = [ln for ln in out.stdout.splitlines() if ln.startswith("compil")]
    assert compiling[0] == "compiling the train step and the evaluation step ..."
    assert re.fullmatch(r"compiled the train step and the evaluation step in [\d.]+ s",
                        compiling[1]), compiling
    records = _records(workdir)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    times = [r["time"] for r in records]  # wall-clock seconds, in order
    assert times == sorted(times) and abs(times[-1] - time.time()) < 600
    for key in ("loss", "ppl", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu",
                "aux/seq_balance", "expert_load_max/0", "drop_fraction/0", "bias_max"):
        assert key in records[-1], key
    assert "val_loss" in records[2] and "val_loss" in records[-1]
    # It learns: from ln(256) = 5.55 at initialisation to below the corpus' unigram entropy
    # within 60 micro-model steps (the tiny config's default run goes much further).
    assert records[-1]["loss"] < entropy - 0.1, (records[-1]["loss"], entropy)
    (events,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["30", "60"]
    saved = [ln for ln in out.stdout.splitlines() if ln.startswith("saved checkpoint")]
    assert saved == ["saved checkpoint step 30", "saved checkpoint step 60"]
    assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    # Running it again says where the run stands, and exits at once (nothing compiled).
    again = _run(args, MLA_MOE_CACHE=str(tmp_path / "cache"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert cli_output.lines(again.stdout) == [
        "already at step 60; pass --config.train.steps=M (M > 60) to continue"]
    assert len(_records(workdir)) == 6
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")) == [events]


@pytest.mark.parametrize("override,message", [
    ("--config.train.seq_len=100000", "error: train.seq_len=100000 exceeds model.max_position"),
    ("--config.train.batch_size=7", "error: train.batch_size=7 (micro-batch 7 with"),
    ("--config.data.path=/nonexistent/store", "error: data.path='/nonexistent/store' does not"),
])
def test_bad_input_is_one_line(tmp_path, override, message):
    out = _run(["launch.train", "--config=configs/tiny.py:micro", f"--workdir={tmp_path / 'w'}",
                override], timeout=120)
    assert out.returncode == 1
    errors = cli_output.lines(out.stderr)
    assert len(errors) == 1 and errors[0].startswith(message), out.stderr
    assert not (tmp_path / "w").exists()


def held_tokens(texts: list[str]) -> int:
    """Byte-tokenizer tokens of the held-out documents (one per byte; no BOS/EOS)."""
    return sum(len(t.encode()) for t in texts if is_validation(t, 0.1))


def test_prepare_data_cli(tmp_path):
    texts = [f"line {i} " * 20 for i in range(50)]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    out = _run(["launch.prepare_data", f"--input={docs}", f"--output={tmp_path / 'store'}",
                "--val_fraction=0.1"], timeout=120)
    assert out.returncode == 0, out.stderr
    # Each document's split is a stable hash of its text (here 3 of the 50 are held out).
    val = sum(is_validation(t, 0.1) for t in texts)
    assert 0 < val < 50
    assert (f"train: {sum(len(t) for t in texts) - held_tokens(texts):,} tokens in {50 - val} "
            f"documents, val: {held_tokens(texts):,} tokens in {val} documents") in out.stdout
    meta = json.loads((tmp_path / "store" / "metadata.json").read_text())
    assert meta["splits"]["val"]["num_docs"] == val
    again = _run(["launch.prepare_data", f"--input={docs}", f"--output={tmp_path / 'store'}"],
                 timeout=120)
    errors = cli_output.lines(again.stderr)
    assert again.returncode == 1 and len(errors) == 1, again.stderr
    assert errors[0].startswith("error: --output=") and "already exists" in errors[0]


def test_two_processes_match_one(tmp_path):
    """The micro model cut to one layer (`one_layer`), the two processes compiled quickly:
    their losses against this process's run of the same config."""
    store = synthetic_store(str(tmp_path / "store"))
    steps = 3
    reference = train(one_layer(micro_config(store, train=dict(steps=steps))),
                      str(tmp_path / "one"))
    assert reference.step == steps
    one = {r["step"]: r["loss"] for r in _records(str(tmp_path / "one"))}

    workdir = str(tmp_path / "two")
    env = _env(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    outs = []
    with reserved_port() as port:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "launch.train", "--config=configs/tiny.py:micro",
                 f"--workdir={workdir}", f"--config.data.path={store}",
                 f"--config.train.steps={steps}", *one_layer_flags(),
                 "--config.log.tensorboard=False", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)
        ]
        try:
            for p in procs:
                outs.append(p.communicate(timeout=400)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "'data': 8" in outs[0]  # 2 processes x 4 devices in one mesh
    two = {r["step"]: r["loss"] for r in _records(workdir)}
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    for s in one:
        np.testing.assert_allclose(two[s], one[s], rtol=1e-5, err_msg=f"step {s}")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
