"""Data that fails while training: a file damaged after the run opened it stops the run with one
error naming the file and the row, line or token range (from a Grain worker process too) and
no checkpoint is written after it; workers end when the training process is SIGKILLed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import micro_config

from mla_moe.data import PipelineConfig, TokenSplit, token_store, train_iterator
from mla_moe.data.raw_source import RawSource
from mla_moe.data.read_errors import DataReadError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 16


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{int(w)}" for w in rng.integers(0, 50, int(rng.integers(5, 40))))
            for _ in range(n)]


def _drain(it, batches=200):
    for _ in range(batches):
        next(it)
    raise AssertionError(f"{batches} batches read from damaged data without an error")


def test_parquet_damaged_after_opening_names_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": _docs(3000)}), path, row_group_size=500)
    source = RawSource(f"raw:{tmp_path}/*.parquet", "byte", sample_chars=100)
    data = bytearray(path.read_bytes())  # damage a page of a middle row group, not the footer
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    it = train_iterator(source, PipelineConfig(seq_len=SEQ_LEN, global_batch=4, prefetch=0))
    with pytest.raises(DataReadError, match=r"web\.parquet: unreadable at row \d+") as e:
        _drain(it, 2000)
    assert e.value.path == str(path) and e.value.unit == "row" and 0 < e.value.index < 3000
    assert f"row {e.value.index}" in str(e.value) and "\n" not in str(e.value)


def test_truncated_zstd_in_a_worker_process_names_file_and_line(tmp_path):
    """Read in a Grain worker process (data.workers=1): the error reaches the training process
    with its fields."""
    import zstandard

    path = tmp_path / "web.jsonl.zst"
    body = "".join(json.dumps({"text": t}) + "\n" for t in _docs(4000)).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(body))  # blocks of 128 KiB
    source = RawSource(f"raw:{tmp_path}/*.jsonl.zst", "byte", sample_chars=100)
    os.truncate(path, os.path.getsize(path) * 2 // 3)  # after the run has opened the source
    cfg = PipelineConfig(seq_len=512, global_batch=8, prefetch=0, workers=1)
    it = train_iterator(source, cfg)
    try:
        with pytest.raises(DataReadError, match=r"web\.jsonl\.zst: truncated or damaged "
                                                r"compressed file after line \d+") as e:
            _drain(it, 500)
    finally:
        it.close()
    assert e.value.path == str(path) and e.value.unit == "line" and 1 < e.value.index < 4000


def test_truncated_store_chunk_names_array_and_tokens(tmp_path, monkeypatch):
    """A store too large to hold in memory is read on demand: a chunk file truncated after the
    store was opened fails the read that needs it, naming the array and the tokens."""
    monkeypatch.setattr(token_store, "IN_MEMORY_BYTES", 0)
    path = str(tmp_path / "store")
    rng = np.random.default_rng(0)
    token_store.write_store(path, {"train": [rng.integers(0, 256, 300) for _ in range(40)],
                                   "val": [rng.integers(0, 256, 50)]},
                            tokenizer="byte", vocab_size=256, chunk_tokens=1000)
    split = TokenSplit(path, "train")
    chunk = os.path.join(path, "train", "tokens", "c", "5")
    os.truncate(chunk, os.path.getsize(chunk) // 2)
    it = train_iterator(split, PipelineConfig(seq_len=SEQ_LEN, global_batch=4, prefetch=2,
                                              num_threads=2))
    with pytest.raises(DataReadError, match=r"train/tokens: tokens \d+-\d+ are unreadable "
                                            r"\(.*c/5.*\); the store was damaged") as e:
        _drain(it, 1000)
    assert e.value.path == os.path.join(path, "train", "tokens") and e.value.unit == "token"
    assert 5000 <= e.value.index + SEQ_LEN and e.value.index < 6000  # a window in chunk 5


def _no_compile_steps(built, state, data, fault_step, train_cfg, verbose=True):
    """`setup.jitted_steps` without compiling: each step leaves the state as it is."""
    def step_fn(state, batch, fault):
        assert batch["inputs"].shape == (train_cfg.batch_size, train_cfg.seq_len)
        return state, {"finite": True, "loss": 1.0, "total_loss": 1.0, "lr": 0.0,
                       "grad_norm": 0.0}

    return step_fn, built.eval_fn


def test_trainer_stops_on_a_damaged_file_without_saving(tmp_path, monkeypatch):
    """The run's .jsonl.zst files are truncated after step 2 (before its save): the
    run stops at the first visit of a damaged file with the DataReadError (one line, which
    the launcher prints as `error: ...` and exits 1), and no checkpoint is written after."""
    import zstandard

    from mla_moe.train import checkpoint as ckpt_lib
    from mla_moe.train import setup, train

    monkeypatch.setattr(setup, "jitted_steps", _no_compile_steps)
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in range(3):
        body = "".join(json.dumps({"text": t}) + "\n" for t in _docs(30, seed=f)).encode()
        (raw / f"part{f}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    trained = []

    def damage_after_step_2(step, metrics):
        trained.append(step)
        if step == 2:
            for f in raw.iterdir():
                os.truncate(f, os.path.getsize(f) // 2)

    config = micro_config(f"raw:{raw}/*.jsonl.zst", train=dict(steps=100, eval_batches=0),
                          data=dict(tokenizer="byte", workers=0),
                          checkpoint=dict(every_steps=2),
                          log=dict(tensorboard=False))
    workdir = tmp_path / "w"
    with pytest.raises(DataReadError, match=r"part\d\.jsonl\.zst: truncated or damaged "
                                            r"compressed file after line \d+") as e:
        train(config, str(workdir), hooks=(damage_after_step_2,))
    assert e.value.path.startswith(str(raw)) and e.value.unit == "line"
    assert "\n" not in str(e.value)
    assert 2 < trained[-1] < 100  # it trained on the data read before the damage
    saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints"))
    assert saved and all(s % 2 == 0 and s <= trained[-1] for s in saved), (saved, trained[-1])
    assert not ckpt_lib.unfinished_saves(workdir / "checkpoints")


def _group(pgid):
    """Processes of process group `pgid`, zombies left out (they hold nothing; their parent,
    or init, reaps them): [(pid, command line)]."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append((int(pid), cmdline[:120]))
    return out


READER = """
import sys
from mla_moe.data import PipelineConfig, train_iterator
from mla_moe.data.raw_source import RawSource

if __name__ == "__main__":
    source = RawSource(f"raw:{sys.argv[1]}/*.jsonl", "byte")
    it = train_iterator(source, PipelineConfig(seq_len=16, global_batch=4, workers=2))
    next(it)
    print("reading", flush=True)
    sys.stdin.read()  # until killed
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process groups from /proc")
def test_workers_end_when_the_training_process_is_killed(tmp_path):
    """A process reading a raw source with data.workers=2 (as the trainer does, in its own
    process group) is killed with SIGKILL once its workers deliver windows: within seconds no
    process of its group is left (the workers, and Python's resource tracker, which ends with
    them). The trainer only adds a compile to this, and the trainer's kill -9 resume test
    covers its checkpoints."""
    for f in range(4):
        (tmp_path / f"part{f}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in _docs(200, seed=f)))
    (tmp_path / "reader.py").write_text(READER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), ROOT])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "reader.py"), str(tmp_path)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        said = []
        for line in proc.stdout:  # jax's start-up lines first
            said.append(line)
            if line == "reading\n":
                break
        assert said[-1:] == ["reading\n"], "".join(said)
        workers = [p for p in _group(proc.pid) if "spawn_main" in p[1]]
        assert len(workers) == 2, _group(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group(proc.pid), _group(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
