"""Preemption across hosts: SIGTERM to one of two processes makes both save the same step and
exit 143 (128 + SIGTERM, so that a scheduler restarts them), and the resumed run is bitwise equal
to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
from ports import reserved_port
from train_helpers import synthetic_store, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _two_processes(store, workdir, *, sigterm_step=-1, sigterm_pid=-1):
    """Runs both processes to the end; returns their (exit status, output). Every run is
    compiled alike (quick compile), so their results compare bitwise."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(4),
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [os.path.join(ROOT, "src"), ROOT, os.environ.get("PYTHONPATH", "")]))
    with reserved_port() as port:
        procs = [subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "preempt_worker.py"), str(port),
             str(i), store, workdir, str(STEPS), str(sigterm_step), str(sigterm_pid)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        try:
            return [(p.wait(timeout=400), p.stdout.read()) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _saved_state(workdir, step) -> dict[str, np.ndarray]:
    """{leaf name: array} of a saved train state, read as numpy (no devices needed)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = dict(getattr(tree, "tree", tree))
    args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in tree}
    return checkpointer.restore(path, restore_args=args)


def test_sigterm_to_one_host_saves_the_same_step_on_both(tmp_path):
    store = synthetic_store(str(tmp_path / "store"))
    whole = str(tmp_path / "whole")
    for status, out in _two_processes(store, whole):
        assert status == 0, out[-3000:]

    cut = str(tmp_path / "cut")
    runs = _two_processes(store, cut, sigterm_step=3, sigterm_pid=1)
    for i, (status, out) in enumerate(runs):
        assert status == 128 + signal.SIGTERM, out[-3000:]
        assert f"process {i}: step 3 preempted True" in out
    assert "saved checkpoint step 3" in runs[0][1]
    assert "stopped at step 3 on SIGTERM (exit status 143)" in runs[0][1]
    assert sorted(os.listdir(os.path.join(cut, "checkpoints"))) == ["2", "3"]

    resumed = _two_processes(store, cut)
    for i, (status, out) in enumerate(resumed):
        assert status == 0, out[-3000:]
        assert f"process {i}: step {STEPS} preempted False" in out
    assert "resuming from step 3" in resumed[0][1]
    timing = ("time", "step_time_s", "tokens_per_s", "mfu")
    untimed = [[{k: v for k, v in r.items() if k not in timing} for r in _records(w)]
               for w in (whole, cut)]
    assert untimed[0] == untimed[1]  # every step's loss, gradient norm, expert loads ...
    a, b = _saved_state(whole, STEPS), _saved_state(cut, STEPS)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
