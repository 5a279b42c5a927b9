"""Tokenizers, token stores, the default corpus and the Grain pipeline (no model involved)."""

import json
import os

import numpy as np
import pytest
from train_helpers import assert_iterator_resumes

from mla_moe.data import (
    ByteTokenizer,
    PipelineConfig,
    TokenSplit,
    eval_batches,
    load_tokenizer,
    prepare,
    prepare_store,
    read_metadata,
    train_iterator,
    write_store,
)
from mla_moe.data import corpus as corpus_lib
from mla_moe.data.pipeline import pack_window


def _docs(rng, n, lo=5, hi=60):
    return [rng.integers(0, 256, int(rng.integers(lo, hi))).astype(np.uint8) for _ in range(n)]


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "store")
    write_store(path, {"train": _docs(rng, 60), "val": _docs(rng, 5)}, tokenizer="byte",
                vocab_size=256)
    return path


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # café ✓"
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert load_tokenizer("byte").vocab_size == 256


def test_hf_tokenizer_json(tmp_path):
    import tokenizers  # installed with the test extra (transformers needs it)
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs.jsonl").write_text(
        "\n".join(json.dumps({"text": s}) for s in ["hello world", "world again x", "hello"] * 4)
    )
    meta = prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "out"),
                   str(tmp_path / "tokenizer.json"), val_fraction=0.25)
    assert meta["vocab_size"] == 4 and meta["dtype"] == "uint8"
    split = TokenSplit(str(tmp_path / "out"), "train")
    assert split.read(0, 2).tolist() == [1, 2]  # "hello world"
    # Copies of a document hash alike, so they land in one split (no leak into validation);
    # when no document hashes into validation, the last one is held out.
    val = sum(prepare_store.is_validation(s, 0.25) for s in ["hello world", "world again x",
                                                             "hello"]) * 4
    assert meta["splits"]["val"]["num_docs"] == max(val, 1)
    assert meta["splits"]["train"]["num_docs"] == 12 - max(val, 1)


def test_prepare_glob_and_validation_split(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * (i + 1))
    meta = prepare(str(tmp_path / "*.txt"), str(tmp_path / "store"), val_fraction=0.2)
    val = [i for i in range(10)
           if prepare_store.is_validation(f"document number {i}\n" * (i + 1), 0.2)]
    assert meta["splits"]["val"]["num_docs"] == max(1, len(val))  # at least one held out
    assert meta["splits"]["train"]["num_docs"] == 10 - max(1, len(val))
    total = sum(len(f"document number {i}\n" * (i + 1)) for i in range(10))
    assert sum(s["num_tokens"] for s in meta["splits"].values()) == total
    assert read_metadata(str(tmp_path / "store"))["tokenizer"] == "byte"
    # Refuses to overwrite, and leaves no temporary directory behind.
    with pytest.raises(FileExistsError, match="already exists"):
        prepare(str(tmp_path / "*.txt"), str(tmp_path / "store"))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".txt")) == ["store"]


def test_prepare_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        prepare(str(tmp_path / "nothing*.txt"), str(tmp_path / "out"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        prepare(str(tmp_path / "empty.txt"), str(tmp_path / "out"))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        prepare(str(tmp_path / "bad.jsonl"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_pack_window_segments_positions_weights(tmp_path):
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]  # lengths 5, 3, 10
    path = str(tmp_path / "s")
    write_store(path, {"train": docs, "val": docs[:1]}, tokenizer="byte", vocab_size=256)
    split = TokenSplit(path, "train")
    ex = pack_window(split, 3, 6)  # tokens 3..9 of [1..5 | 10..12 | 20..29]
    np.testing.assert_array_equal(ex["inputs"], [4, 5, 10, 11, 12, 20])
    np.testing.assert_array_equal(ex["targets"], [5, 10, 11, 12, 20, 21])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 0, 1, 2, 0])
    # No loss on the target that crosses into the next document.
    np.testing.assert_array_equal(ex["weights"], [1, 0, 1, 1, 0, 1])


def test_shuffle_is_seeded_and_covers_every_window(store, tmp_path):
    split = TokenSplit(store, "train")
    cfg = PipelineConfig(seq_len=16, global_batch=4, seed=3, num_threads=0, prefetch=0)
    first = [next(train_iterator(split, cfg))["inputs"] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    other = next(train_iterator(split, PipelineConfig(16, 4, seed=4)))["inputs"]
    assert not np.array_equal(first[0], other)
    # Tokens equal to their offset: a window's first token names it.
    path = str(tmp_path / "counting")
    write_store(path, {"train": [np.arange(1000)], "val": [np.arange(50)]}, tokenizer="byte",
                vocab_size=4096)
    split = TokenSplit(path, "train")
    n = (split.num_tokens - 1) // 10  # 99 windows
    it = train_iterator(split, PipelineConfig(seq_len=10, global_batch=3, seed=0))
    epoch = np.concatenate([next(it)["inputs"][:, 0] for _ in range(n // 3)])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n) * 10)  # each window once
    assert not np.array_equal(epoch, np.arange(n) * 10)  # ... in shuffled order
    second = np.concatenate([next(it)["inputs"][:, 0] for _ in range(n // 3)])
    np.testing.assert_array_equal(np.sort(second), np.arange(n) * 10)
    assert not np.array_equal(second, epoch)  # reshuffled each epoch


def test_process_shards_assemble_the_global_batch(store):
    split = TokenSplit(store, "train")
    whole = train_iterator(split, PipelineConfig(seq_len=8, global_batch=6, seed=1))
    parts = [train_iterator(split, PipelineConfig(8, 6, seed=1, process_index=p, process_count=3))
             for p in range(3)]
    for _ in range(4):
        g = next(whole)
        local = [next(it) for it in parts]
        assert local[0]["inputs"].shape == (2, 8)
        for key in g:
            np.testing.assert_array_equal(g[key], np.concatenate([b[key] for b in local]))


def test_iterator_state_resumes_exactly(store):
    split = TokenSplit(store, "train")
    cfg = PipelineConfig(seq_len=8, global_batch=4, seed=2)
    assert_iterator_resumes(split, cfg, skip=5)


def test_eval_batches_fixed_and_wrapping(store):
    split = TokenSplit(store, "val")
    cfg = PipelineConfig(seq_len=16, global_batch=8)
    a, b = eval_batches(split, cfg, 3), eval_batches(split, cfg, 3)
    assert len(a) == 3 and a[0]["inputs"].shape == (8, 16)
    np.testing.assert_array_equal(a[2]["targets"], b[2]["targets"])


def test_too_little_data(store):
    split = TokenSplit(store, "train")
    with pytest.raises(ValueError, match="fewer than train.batch_size"):
        train_iterator(split, PipelineConfig(seq_len=split.num_tokens // 2, global_batch=4))
    with pytest.raises(ValueError, match="not divisible"):
        PipelineConfig(seq_len=8, global_batch=5, process_count=2)


def test_default_corpus_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_MOE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus_lib, "_stdlib_files", lambda: corpus_lib._stdlib_files_all()[:30])
    path = corpus_lib.default_corpus()
    assert path.startswith(str(tmp_path))
    mtime = os.path.getmtime(os.path.join(path, "metadata.json"))
    assert corpus_lib.default_corpus() == path
    assert os.path.getmtime(os.path.join(path, "metadata.json")) == mtime
    split = TokenSplit(path, "train")
    text = bytes(split.read(0, 2000).tolist()).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text  # Python source
    assert 2.0 < split.unigram_entropy() < 5.5
