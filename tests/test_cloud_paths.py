"""Workdirs and token stores as URLs: `mla_moe.paths` keeps a gs:// location a URL for epath
and tensorstore (never an os path), and a local one an absolute path; the token store reads
through a tensorstore kvstore URL as through a path."""

import os

import numpy as np

from mla_moe import paths
from mla_moe.data import TokenSplit, write_store


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = paths.resolve("gs://bucket/runs/a")
    assert str(run / "checkpoints") == "gs://bucket/runs/a/checkpoints"
    assert paths.is_url(run) and not paths.is_url(paths.resolve("w"))
    assert str(paths.resolve("w")) == os.path.join(str(tmp_path), "w")
    assert paths.kvstore("gs://bucket/store/train/tokens") == "gs://bucket/store/train/tokens/"
    assert paths.kvstore("/d/train/tokens") == {"driver": "file", "path": "/d/train/tokens"}


def test_token_store_reads_through_a_kvstore_url(tmp_path):
    store = str(tmp_path / "store")
    docs = [np.arange(50) % 256, np.arange(70) % 256]
    write_store(store, {"train": docs, "val": docs[:1]}, tokenizer="byte", vocab_size=256)
    local = TokenSplit(store, "train")
    # tensorstore's file:// URL is the local stand-in for gs://: the same spec path.
    from mla_moe.data import token_store

    spec = token_store._spec(f"file://{store}/train/tokens")
    assert spec["kvstore"] == f"file://{store}/train/tokens/"
    import tensorstore as ts

    via_url = ts.open(spec, open=True).result().read().result()
    np.testing.assert_array_equal(via_url, local.read(0, local.num_tokens))
