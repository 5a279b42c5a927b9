"""Helpers for the training tests: the micro run config, small token stores and a simulated
preemption (the persistent compilation cache their subprocesses use is set up in conftest)."""

from __future__ import annotations

import os

import numpy as np

from configs.tiny import micro_config, micro_model
from mla_moe.data import token_store

__all__ = ["FAST_COMPILE_FLAGS", "ONE_LAYER", "micro_config", "micro_model", "one_layer",
           "one_layer_flags", "sigterm_at", "synthetic_store", "xla_flags"]

# XLA:CPU's quick compile (the unit tests' FAST_COMPILE compiler options) as XLA_FLAGS for the
# training subprocesses: they compile in about half the time. Only for runs whose results are
# compared with runs compiled the same way, or within a tolerance (it may round differently
# from the default compile, which this process's own runs use).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# The micro model cut to one MoE layer without the MTP module (the dense layer and MTP module
# would double the compile): for the tests of launchers, processes and resumption, whose
# properties do not depend on the model's depth; the train step's own tests cover every layer.
ONE_LAYER = dict(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)


def one_layer(config):
    """`config` (a micro run config) with the model cut to `ONE_LAYER`; returns it."""
    config.model.update(ONE_LAYER)
    return config


def one_layer_flags() -> list[str]:
    """`ONE_LAYER` as launch.train flags."""
    return [f"--config.model.{k}={v}" for k, v in ONE_LAYER.items()]


def xla_flags(devices: int, fast: bool = True) -> str:
    """XLA_FLAGS for a subprocess: `devices` simulated CPU devices, quick compile (`fast`)."""
    return f"--xla_force_host_platform_device_count={devices}" + (
        f" {FAST_COMPILE_FLAGS}" if fast else "")


def synthetic_store(path: str, num_docs: int = 40, doc_len: int = 300, seed: int = 0) -> str:
    """A byte-vocabulary store of random documents with a learnable pattern (token i+1 often
    follows token i), written to `path`."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(doc_len // 2, doc_len * 3 // 2))
        start = rng.integers(0, 256)
        steps = np.where(rng.random(n) < 0.7, 1, rng.integers(0, 256, n))
        docs.append(((start + np.cumsum(steps)) % 256).astype(np.uint8))
    token_store.write_store(
        path, {"train": docs[:-4], "val": docs[-4:]}, tokenizer="byte", vocab_size=256,
        source="synthetic",
    )
    return os.path.abspath(path)


def sigterm_at(step: int):
    """A trainer hook that sends this process SIGTERM after `step` (a simulated preemption)."""
    import signal

    def hook(s, metrics):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def assert_iterator_resumes(split, cfg, skip: int, check: int = 3) -> None:
    """A train iterator over `split` advanced `skip` batches, saved, and restored into a fresh
    iterator gives exactly the next `check` batches of the original."""
    from mla_moe.data import train_iterator

    it = train_iterator(split, cfg)
    for _ in range(skip):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(check)]
    fresh = train_iterator(split, cfg)
    fresh.set_state(state)
    for e in expected:
        got = next(fresh)
        for key in e:
            np.testing.assert_array_equal(e[key], got[key])


def reference_window(toks, docs) -> dict:
    """One packed window of seq_len + 1 tokens, computed slowly: `toks` the tokens, `docs` each
    token's document index; segments count from 1 within the window, positions restart at
    each document, and a target in another document than its input gets weight 0."""
    segment, position, pos = [], [], 0
    for i, doc in enumerate(docs):
        if i and doc != docs[i - 1]:
            pos = 0
        segment.append(doc - docs[0] + 1)
        position.append(pos)
        pos += 1
    return {"inputs": toks[:-1], "targets": toks[1:], "segment_ids": segment[:-1],
            "positions": position[:-1],
            "weights": [float(a == b) for a, b in zip(segment[:-1], segment[1:])]}
