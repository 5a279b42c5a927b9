"""Exact resume after SIGTERM, after Ctrl-Cs at random moments of saves and after SIGKILL (a
token store alone, and mixed with raw files tokenized on the fly);
continuing a finished run; a fresh start over an earlier attempt's files; restoring onto a
different mesh.

The micro model is cut to one MoE layer without MTP (`train_helpers.one_layer`, in this file's
`_config` and `_launch`): exact resumption does not depend on the model's depth, and the
launcher runs that the kills interrupt compile in half the time."""

import glob
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import micro_config, one_layer, one_layer_flags, sigterm_at, synthetic_store

from mla_moe.train import train
from mla_moe.train.resume import continue_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _config(data_path, **sections):
    """The micro run config of every run here (and `_launch`'s), its model cut to one layer."""
    return one_layer(micro_config(data_path, **sections))


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
    result = train(_config(store, train=dict(steps=STEPS)), workdir)
    assert result.step == STEPS and result.resumed_from is None
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return workdir, losses


def test_sigterm_then_resume_is_bitwise_identical(straight, store, tmp_path):
    workdir = str(tmp_path / "w")
    config = _config(store, train=dict(steps=STEPS))
    first = train(config, workdir, hooks=(sigterm_at(STEPS // 2),))
    assert first.preempted and first.step == STEPS // 2
    assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))  # saved on the signal
    second = train(config, workdir)
    assert second.resumed_from == STEPS // 2 and second.step == STEPS
    assert _losses(workdir) == straight[1]  # every step, bitwise


def _launch(workdir, store):
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py:micro",
           f"--workdir={workdir}", f"--config.data.path={store}",
           f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=2",
           *one_layer_flags(), "--config.log.tensorboard=False"]
    path = os.pathsep.join(["src", ".", os.environ.get("PYTHONPATH", "")])
    return cmd, {**os.environ, "PYTHONPATH": path}


def _signal_after_save(cmd, env, workdir, signals):
    """Runs `cmd` until it reports its first save, checks that the save is complete, sends
    `signals` ((signal, seconds to wait before it), ...) and returns (exit status, output)."""
    # Its own process group: data workers that outlive a killed trainer (they hold the
    # output pipe open) are killed with it at the end.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("saved checkpoint step 2") or time.time() > deadline:
                break
        # Reported only once complete: renamed from 2.orbax-checkpoint-tmp into place.
        assert "2" in os.listdir(os.path.join(workdir, "checkpoints")), "".join(lines[-20:])
        for sig, wait in signals:
            time.sleep(wait)
            proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines += proc.stdout.readlines()
    return proc.returncode, "".join(lines)


def test_ctrl_c_at_random_moments_of_saves_loses_nothing(straight, store, tmp_path, capsys):
    """One to three Ctrl-Cs, at random moments from the first reported save on: the first
    stops after the step with a checkpoint, a second waits for a save in flight (or stops at
    once without one), a third abandons it. Whichever happens, the process exits 130 with our
    lines and no traceback, and the rerun continues exactly from a complete checkpoint."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    signals = [(signal.SIGINT, rng.uniform(0, 0.3) if i else 0.0)
               for i in range(rng.randint(1, 3))]
    workdir = str(tmp_path / "w")
    cmd, env = _launch(workdir, store)
    status, out = _signal_after_save(cmd, env, workdir, signals)
    why = f"seed {seed}, signals {signals}:\n{out[-3000:]}"
    assert status == 128 + signal.SIGINT, why
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, why
    assert "Ctrl-C (SIGINT): stopping after this step with a checkpoint" in out, why
    last = out.strip().splitlines()[-1]
    assert re.match(r"(stopped at step \d+ on Ctrl-C .*resumes from checkpoint step \d+"
                    r"|Ctrl-C: (abandoning checkpoint step \d+; |stopping now; )the latest "
                    r"complete checkpoint is step \d+)$", last), why
    # The latest complete checkpoint: the one the last line names, or the abandoned save if
    # its files were complete by then (Orbax had renamed it, and was removing older steps).
    allowed = {int(last.split()[-1])} | {int(x) for x in re.findall(r"abandoning checkpoint "
                                                                      r"step (\d+)", last)}
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert max(steps) in allowed, why
    result = train(_config(store, train=dict(steps=STEPS), log=dict(tensorboard=False)),
                   workdir)
    assert result.resumed_from == max(steps) and result.step == STEPS, why
    said = capsys.readouterr().out
    assert (f"resuming from step {max(steps)}" in said if max(steps) < STEPS
            else f"already at step {STEPS}" in said), why
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert _losses(workdir) == straight[1], why  # every step, bitwise


def test_sigkill_then_resume_is_bitwise_identical(straight, store, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    cmd, env = _launch(workdir, store)
    # Save 2 is complete; save 4 may be half-written, or not begun, when the kill lands.
    wait = random.uniform(0, 0.1)
    status, out = _signal_after_save(cmd, env, workdir, [(signal.SIGKILL, wait)])
    assert status == -signal.SIGKILL, out[-3000:]
    result = train(_config(store, train=dict(steps=STEPS), log=dict(tensorboard=False)),
                   workdir)
    assert result.resumed_from in (2, 4) and result.step == STEPS, (wait, out[-3000:])
    assert f"resuming from step {result.resumed_from}" in capsys.readouterr().out
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert _losses(workdir) == straight[1]


def test_sigkill_with_a_raw_source_then_resume_is_bitwise_identical(store, tmp_path, capsys):
    """The store mixed with raw .jsonl files tokenized on the fly in a Grain worker process
    (`raw:GLOB`, data.workers=1): kill -9 after a save, resume, and every step's loss equals an
    uninterrupted run's."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(1)
    for f in range(2):
        with open(raw / f"part{f}.jsonl", "w", encoding="utf-8") as fh:
            for _ in range(30):
                text = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, rng.integers(50, 400)))
                fh.write(json.dumps({"text": text}) + "\n")
    path = f"{store},raw:{raw}/*.jsonl"

    def config():
        return _config(path, train=dict(steps=STEPS), log=dict(tensorboard=False),
                       data=dict(tokenizer="byte", workers=1))

    straight_dir = str(tmp_path / "straight")
    train(config(), straight_dir)
    expected = _losses(straight_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))
    workdir = str(tmp_path / "w")
    cmd, env = _launch(workdir, path)
    cmd += ["--config.data.tokenizer=byte", "--config.data.workers=1"]
    wait = random.uniform(0, 0.1)
    status, out = _signal_after_save(cmd, env, workdir, [(signal.SIGKILL, wait)])
    assert status == -signal.SIGKILL, out[-3000:]
    result = train(config(), workdir)
    assert result.resumed_from in (2, 4) and result.step == STEPS, (wait, out[-3000:])
    assert _losses(workdir) == expected


def test_restore_onto_another_mesh_and_continue(straight, store, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    for step in os.listdir(os.path.join(workdir, "checkpoints")):
        if step.isdigit() and int(step) > 4:
            shutil.rmtree(os.path.join(workdir, "checkpoints", step))
    config = _config(store, train=dict(steps=STEPS), mesh=dict(data=2, expert=4))
    result = train(config, workdir)  # saved under data=8, restored into data=2 x expert=4
    assert result.resumed_from == 4 and result.step == STEPS
    losses = _losses(workdir)
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(losses[step], straight[1][step], rtol=1e-5, err_msg=str(step))


def _events(workdir) -> list[tuple[int, set]]:
    """(step, tags) of each logged step in the workdir's one TensorBoard events file, with
    every record's checksums verified."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    (path,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    with open(path, "rb") as f:
        blob = f.read()
    out, i = [], 0
    while i < len(blob):
        (n,) = struct.unpack_from("<Q", blob, i)
        assert struct.unpack_from("<I", blob, i + 8)[0] == masked_crc32c(blob[i:i + 8])
        data = blob[i + 12:i + 12 + n]
        assert struct.unpack_from("<I", blob, i + 12 + n)[0] == masked_crc32c(data)
        event = event_pb2.Event.FromString(data)
        if event.HasField("summary"):
            out.append((event.step, {v.tag for v in event.summary.value}))
        i += 16 + n
    return out


def test_fresh_start_over_an_unfinished_attempt(straight, store, tmp_path, capsys):
    """A workdir whose run never completed a save (its metrics, TensorBoard events and a half
    written checkpoint remain) starts over, says so, and keeps one copy of each step."""
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    os.makedirs(os.path.join(workdir, "checkpoints", "2.orbax-checkpoint-tmp", "state"))
    result = train(_config(store, train=dict(steps=STEPS)), workdir)
    assert result.resumed_from is None and result.step == STEPS
    out = capsys.readouterr().out
    assert "removing 2.orbax-checkpoint-tmp: a save that never completed" in out
    assert (f"starting at step 0, and dropping the {STEPS} rows of metrics.jsonl (steps 1-"
            f"{STEPS}) that this run rewrites") in out
    assert _losses(workdir) == straight[1]  # each step once (checked by _losses), bitwise
    events = _events(workdir)
    assert [s for s, _ in events] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "grad_norm"} <= events[0][1] and "time" not in events[0][1]


def test_continuing_a_finished_run_keeps_its_schedule(straight, store, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    config = _config(store, train=dict(steps=STEPS + 2))
    result = train(config, workdir)
    assert result.resumed_from == STEPS and result.step == STEPS + 2
    out = capsys.readouterr().out
    assert (f"train.steps {STEPS} -> {STEPS + 2}: the learning rate keeps this run's schedule "
            f"(cosine decay to step {STEPS}, then held at 3.00e-04 to step {STEPS + 2}); pass "
            "--config.train.decay_steps=M to decay to step M instead") in out
    saved = json.loads(open(os.path.join(workdir, "config.json")).read())["train"]
    assert (saved["steps"], saved["decay_steps"]) == (STEPS + 2, STEPS)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lr = {r["step"]: r["lr"] for r in map(json.loads, f)}
    np.testing.assert_allclose([lr[STEPS + 1], lr[STEPS + 2]], 3e-4, rtol=1e-6)  # the floor
    losses = _losses(workdir)
    assert {s: losses[s] for s in straight[1]} == straight[1]
    assert [s for s, _ in _events(workdir)] == list(range(1, STEPS + 3))
    # Again: nothing to do, and it says how to go on.
    assert train(config, workdir).step == STEPS + 2
    out = capsys.readouterr().out
    assert out.strip() == (f"already at step {STEPS + 2}; pass --config.train.steps=M "
                           f"(M > {STEPS + 2}) to continue")


def test_a_new_decay_length_says_what_the_learning_rate_does(store):
    saved = {"train": {"steps": 150, "decay_steps": 0}}
    config = micro_config(store, train=dict(steps=200, decay_steps=200, warmup_steps=15,
                                            learning_rate=3e-3))
    same, message = continue_schedule(saved, config, 150)
    assert same.train.decay_steps == 200
    assert message.startswith("train.decay_steps 150 -> 200: the learning rate of step 151 is ")
    before, after = (float(x) for x in re.findall(r"\d\.\d\de-\d\d", message))
    assert before > after == 3e-4  # the floor, raised again by the longer cosine
    config.train.decay_steps = 0
    kept, message = continue_schedule(saved, config, 150)
    assert kept.train.decay_steps == 150 and config.train.decay_steps == 0
    assert "held at 3.00e-04 to step 200" in message
    config.train.steps = 150
    assert continue_schedule(saved, config, 150) == (config, None)
