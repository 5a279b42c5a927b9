"""Bad input is refused with one line before compilation; NaN steps stop (or skip) without
touching checkpoints; a workdir of another config is refused without writing anything."""

import os
import shutil

import jax
import numpy as np
import pytest
from train_helpers import micro_config, sigterm_at, synthetic_store

from mla_moe.data import write_store
from mla_moe.train import (
    ConfigError,
    IncompatibleWorkdirError,
    NonFiniteLossError,
    train,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(str(tmp_path_factory.mktemp("data") / "store"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store):
    """A workdir with checkpoints at steps 2 and 4 of an 8-step run (preempted at 4)."""
    workdir = str(tmp_path_factory.mktemp("run") / "w")
    result = train(micro_config(store, train=dict(steps=8)), workdir, hooks=(sigterm_at(4),))
    assert result.step == 4 and result.preempted
    return workdir


def _snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def _no_compile(monkeypatch):
    """Any jit compilation fails the test: the checks must come first."""
    def boom(*a, **k):
        raise AssertionError("compiled before rejecting bad input")
    monkeypatch.setattr(jax, "jit", boom)


@pytest.mark.parametrize("section,field,value,match", [
    ("train", "steps", 0, "train.steps must be a positive integer"),
    ("train", "learning_rate", -1.0, "train.learning_rate must be > 0"),
    ("train", "nan_policy", "ignore", "train.nan_policy must be one of"),
    ("train", "seq_len", 512, r"train.seq_len=512 exceeds model.max_position_embeddings=256"),
    ("train", "batch_size", 12,
     r"train.batch_size=12 .* not divisible by the data-parallel size 8"),
    ("train", "grad_accum_steps", 3, "not divisible by train.grad_accum_steps=3"),
    ("model", "hidden_size", -4, "model: hidden_size must be a positive integer"),
    ("model", "num_experts_per_tok", 99, "model: num_experts_per_tok=99 exceeds"),
    ("mesh", "data", 3, "needs 3 devices, but there are 8"),
    ("mesh", "expert", 3, "mesh.data=-1: 8 devices are not divisible"),
    ("checkpoint", "every_steps", 0, "checkpoint.every_steps must be > 0"),
])
def test_invalid_values(tmp_path, monkeypatch, store, section, field, value, match):
    config = micro_config(store)
    config[section][field] = value
    _no_compile(monkeypatch)
    with pytest.raises((ConfigError, ValueError), match=match) as e:
        train(config, str(tmp_path / "w"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def test_missing_empty_and_small_data(tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(micro_config(str(tmp_path / "nope")), str(tmp_path / "w"))
    os.makedirs(tmp_path / "notastore")
    with pytest.raises(FileNotFoundError, match="not a token store"):
        train(micro_config(str(tmp_path / "notastore")), str(tmp_path / "w"))
    with pytest.raises(ValueError, match="no tokens"):
        write_store(str(tmp_path / "empty"), {"train": [np.array([], np.uint8)], "val": []},
                    tokenizer="byte", vocab_size=256)
    small = str(tmp_path / "small")
    write_store(small, {"train": [np.arange(100) % 256], "val": [np.arange(50)]},
                tokenizer="byte", vocab_size=256)
    with pytest.raises(ValueError, match="fewer than train.batch_size=8"):
        train(micro_config(small), str(tmp_path / "w"))
    big_vocab = str(tmp_path / "bigvocab")
    write_store(big_vocab, {"train": [np.arange(5000)], "val": [np.arange(500)]},
                tokenizer="byte", vocab_size=5000)
    with pytest.raises(ConfigError, match="vocabulary of 5000 tokens but model.vocab_size=256"):
        train(micro_config(big_vocab), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_incompatible_workdir_is_refused_untouched(trained, store, monkeypatch):
    before = _snapshot(trained)
    config = micro_config(store, train=dict(steps=8))
    config.model.hidden_size = 96
    _no_compile(monkeypatch)
    with pytest.raises(IncompatibleWorkdirError, match=r"model.hidden_size: 64 -> 96"):
        train(config, trained)
    config = micro_config(store, train=dict(steps=8, seq_len=16))
    with pytest.raises(IncompatibleWorkdirError, match=r"train.seq_len: 32 -> 16"):
        train(config, trained)
    assert _snapshot(trained) == before


def test_nan_stops_naming_the_step_checkpoints_untouched(trained, store, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    before = _snapshot(os.path.join(workdir, "checkpoints"))
    config = micro_config(store, train=dict(steps=8, fault_nan_step=6))
    with pytest.raises(NonFiniteLossError, match=r"^step 6: non-finite loss .*latest: step 4"):
        train(config, workdir)
    assert _snapshot(os.path.join(workdir, "checkpoints")) == before
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_nan_skip_policy_continues(trained, store, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    config = micro_config(store, train=dict(steps=8, fault_nan_step=6, nan_policy="skip"))
    seen = {}
    result = train(config, workdir, hooks=(lambda s, m: seen.__setitem__(s, m),))
    assert result.step == 8
    assert not seen[6]["finite"] and seen[5]["finite"] and seen[7]["finite"]
    assert np.isfinite(seen[7]["loss"])
    assert "step 6: non-finite loss" in capsys.readouterr().out
