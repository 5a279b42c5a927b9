"""A checkpoint's data position belongs to one stream (sources, weights, store contents, raw
files, process count, ...): a resume with another is refused before the train state is
restored, naming the fields that differ; the same stream resumes exactly."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import micro_config, synthetic_store

from mla_moe.data import stream_state
from mla_moe.data.stream_state import StreamMismatchError
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import resume, setup


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return [synthetic_store(str(root / f"s{i}"), num_docs=20, seed=i) for i in range(3)]


def _config(path, train=None, **data):
    return micro_config(path, data=data, train=train or {}, checkpoint=dict(async_save=False))


def _open(config):
    return setup.open_data(config, config_lib.validate(config))


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _saved_run(tmp_path, config):
    """A checkpointer holding step 2 (a stand-in state and the data position after 2
    batches), and the next 2 batches of that run."""
    data = _open(config)
    _batches(data.iterator, 2)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
    ckpt.save(2, {"step": jnp.array(2, jnp.int32)}, data.iterator, force=True)
    ckpt.wait()
    return ckpt, _batches(data.iterator, 2)


def _restore(ckpt, iterator):
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32,
                                             sharding=jax.sharding.SingleDeviceSharding(
                                                 jax.devices()[0]))}
    return ckpt.restore(2, abstract, iterator)


@pytest.mark.parametrize("change,fields", [
    (dict(weights="0.7,0.3"), ["sources[0].weight: 0.5 -> 0.7", "sources[1].weight: 0.5 -> 0.3"]),
    (dict(path=2), ["sources[1].path: '{s1}' -> '{s2}'"]),
    (dict(process_count=2), ["process_count: 1 -> 2"]),
])
def test_another_stream_is_refused_naming_the_fields(stores, tmp_path, monkeypatch, change,
                                                     fields):
    ckpt, _ = _saved_run(tmp_path, _config(f"{stores[0]},{stores[1]}", weights="0.5,0.5"))
    data = dict(weights=change.get("weights", "0.5,0.5"))
    path = f"{stores[0]},{stores[change.get('path', 1)]}"
    if "process_count" in change:  # what open_data (and Grain's file names) read
        monkeypatch.setattr(jax, "process_count", lambda: change["process_count"])
    fresh = _open(_config(path, **data))
    with pytest.raises(StreamMismatchError) as e:
        stream_state.check_saved(ckpt.data_directory(2), fresh.iterator, 2)
    message = str(e.value)
    assert message.startswith("checkpoint step 2 holds the data position of another data "
                              "stream (")
    for field in fields:
        assert field.format(s1=stores[1], s2=stores[2]) in message, message
    if "process_count" not in change:  # the iterator refuses it too, when restored directly
        with pytest.raises(StreamMismatchError,
                           match="the checkpoint holds .*" + re.escape(fields[0].split(":")[0])):
            _restore(ckpt, fresh.iterator)
    ckpt.close()


def test_changed_store_or_raw_files_are_refused(stores, tmp_path):
    """The same data.path, other contents: a store prepared again (another token count), a raw
    glob that matches one more file."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in range(2):
        (raw / f"part{f}.jsonl").write_text(
            "".join(json.dumps({"text": f"document {i} of file {f} " * 5}) + "\n"
                    for i in range(30)))
    store = str(tmp_path / "store")
    synthetic_store(store, num_docs=20, seed=0)
    config = _config(f"{store},raw:{raw}/*.jsonl", train=dict(eval_batches=0), tokenizer="byte",
                     workers=0)
    ckpt, _ = _saved_run(tmp_path, config)
    synthetic_store(store + ".new", num_docs=25, seed=0)
    os.rename(store, store + ".old")
    os.rename(store + ".new", store)
    (raw / "part2.jsonl").write_text(json.dumps({"text": "a new file"}) + "\n")
    fresh = _open(config)
    with pytest.raises(StreamMismatchError) as e:
        stream_state.check_saved(ckpt.data_directory(2), fresh.iterator, 2)
    assert "sources[0].tokens: " in str(e.value)
    assert "sources[1].files: '2 files, sha1 " in str(e.value)
    assert "-> '3 files, sha1 " in str(e.value)
    ckpt.close()


def test_the_same_stream_resumes_exactly(stores, tmp_path):
    config = _config(f"{stores[0]},{stores[1]}", weights="0.5,0.5")
    ckpt, expected = _saved_run(tmp_path, config)
    fresh = _open(config)
    stream_state.check_saved(ckpt.data_directory(2), fresh.iterator, 2)
    assert int(_restore(ckpt, fresh.iterator)["step"]) == 2
    for want, got in zip(expected, _batches(fresh.iterator, 2)):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    # A position saved before states named their stream restores as it is.
    old = _open(config).iterator
    old.set_state(json.loads((ckpt.data_directory(2) / "process_0-of-1.json").read_text(
        ))["position"])
    np.testing.assert_array_equal(next(old)["inputs"], expected[0]["inputs"])
    ckpt.close()


def test_resume_refuses_before_restoring_anything(stores, tmp_path, monkeypatch):
    """`resume.open_workdir` checks the data position before the checkpoint's shapes or state
    (`built` is never read) and changes nothing in the checkpoints."""
    workdir = tmp_path / "w"
    ckpt, _ = _saved_run(workdir, _config(stores[0]))
    ckpt.close()
    before = sorted(os.listdir(workdir / "checkpoints" / "2" / "data"))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config = _config(stores[0])
    fresh = _open(config)  # this process reads as process 0 of 2
    monkeypatch.undo()  # (Orbax, below, reads the real count)
    with pytest.raises(StreamMismatchError, match=r"process_count: 1 -> 2"):
        resume.open_workdir(resume.paths.resolve(str(workdir)), config, None, fresh.iterator,
                            init_state=None, read_first=False, is_main=True)
    assert sorted(os.listdir(workdir / "checkpoints" / "2" / "data")) == before
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
