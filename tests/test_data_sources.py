"""Corpus readers (one tiny fixture per format, written here), tokenizers, and the streamed,
parallel, sharded `prepare` (no model involved)."""

import gzip
import json
import os

import numpy as np
import pytest

from mla_moe.data import (
    TokenSplit,
    check_fits,
    detect_format,
    expand_inputs,
    load_tokenizer,
    prepare,
    prepare_store,
    read_documents,
    read_metadata,
    readers,
)
from mla_moe.errors import ConfigError, InputError

DOCS = [f"doc {i}: " + "héllo wörld ✓ " * (i % 7) + "\n" * (i % 3) for i in range(60)]


def _jsonl(docs, key="text") -> bytes:
    return "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write_fixtures(d) -> dict[str, list[str]]:
    """One file per format; {path: its documents}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from array_record.python.array_record_module import ArrayRecordWriter

    out = {}
    (d / "a.jsonl").write_bytes(_jsonl(DOCS[:10]))
    out[str(d / "a.jsonl")] = DOCS[:10]
    (d / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS[10:20])))
    out[str(d / "b.jsonl.gz")] = DOCS[10:20]
    # Two zstd frames in one file, as concatenated shards are.
    z = zstandard.ZstdCompressor()
    frames = z.compress(_jsonl(DOCS[20:25])) + z.compress(_jsonl(DOCS[25:30]))
    (d / "c.jsonl.zst").write_bytes(frames)
    out[str(d / "c.jsonl.zst")] = DOCS[20:30]
    pq.write_table(pa.table({"id": list(range(15)), "text": DOCS[30:45]}), d / "d.parquet",
                   row_group_size=4)
    out[str(d / "d.parquet")] = DOCS[30:45]
    w = ArrayRecordWriter(str(d / "e.array_record"), "group_size:1")
    for doc in DOCS[45:59]:
        w.write(doc.encode())
    w.close()
    out[str(d / "e.array_record")] = DOCS[45:59]
    (d / "f.txt").write_text(DOCS[59])
    out[str(d / "f.txt")] = [DOCS[59]]
    (d / "g.txt.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    out[str(d / "g.txt.gz")] = [DOCS[0]]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return d, write_fixtures(d)


def test_every_format_reads_its_documents(corpus):
    _, files = corpus
    for path, docs in files.items():
        assert list(read_documents(path)) == docs, path
    assert detect_format(next(p for p in files if p.endswith(".zst"))) == ("jsonl", "zstd")
    assert detect_format(next(p for p in files if p.endswith(".parquet"))) == ("parquet", "")


def test_globs_and_lists(corpus, tmp_path):
    d, files = corpus
    got = expand_inputs(f"{d}/*.jsonl*, {d}/d.parquet,{d}/a.jsonl")
    assert got == [f"{d}/a.jsonl", f"{d}/b.jsonl.gz", f"{d}/c.jsonl.zst", f"{d}/d.parquet"]
    with pytest.raises(FileNotFoundError, match=r"--input=.*nothing\*.*matches no files"):
        expand_inputs(f"{d}/*.txt,{d}/nothing*")
    with pytest.raises(FileNotFoundError, match="--input is empty"):
        expand_inputs(" , ")


def test_compressed_or_binary_never_read_as_text(tmp_path):
    import zstandard

    # Compressed bytes under a plain name are still decompressed (the magic number decides).
    (tmp_path / "plain_name.jsonl").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(["x"])))
    assert list(read_documents(str(tmp_path / "plain_name.jsonl"))) == ["x"]
    cases = {
        "blob.bin": (bytes(range(256)) * 4, "binary data"),
        "data.jsonl.zst": (_jsonl(["not compressed"]), "not zstd-compressed"),
        "data.parquet": (_jsonl(["not parquet"]), "named as parquet"),
        "data.jsonl.bz2": (b"BZh91AY&SY" + bytes(20), "bzip2-compressed input is not supported"),
        "archive.tar.gz": (gzip.compress(b"name\x00\x00\x00" + bytes(500)), "once decompressed"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=message) as e:
            list(read_documents(str(tmp_path / name)))
        assert name in str(e.value)


def test_damaged_inputs_name_file_and_place(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    body = _jsonl(DOCS * 20)
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body)[:-200])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(body)[:-200])
    for name in ("cut.jsonl.zst", "cut.jsonl.gz"):
        with pytest.raises(InputError, match=f"{name}: truncated"):
            list(read_documents(str(tmp_path / name)))
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match=r"other.parquet: no column 'text' \(columns: content\)"):
        list(read_documents(str(tmp_path / "other.parquet")))
    assert list(read_documents(str(tmp_path / "other.parquet"), "content")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_bytes(_jsonl(["ok"]) + b'{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: invalid UTF-8 at line 2, byte offset 13"):
        list(read_documents(str(tmp_path / "bad.jsonl")))
    (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfedef")
    with pytest.raises(InputError, match=r"bad.txt: invalid UTF-8 at byte offset 3"):
        list(read_documents(str(tmp_path / "bad.txt")))
    before = readers.REPLACED
    assert list(read_documents(str(tmp_path / "bad.txt"), utf8_errors="replace")) == [
        "abc\ufffd\ufffddef"]
    assert readers.REPLACED - before == 2


def _word_level(path, vocab):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(path))
    return t


def test_tokenizers_json_checkpoint_dir_sentencepiece(tmp_path):
    import sentencepiece

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    _word_level(tmp_path / "tokenizer.json", vocab)
    bare = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert bare.vocab_size == 5
    assert [d.tolist() for d in bare.encode_documents(["hello world", "world"])] == [[3, 4], [4]]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_eos_token": True}))
    framed = load_tokenizer(str(tmp_path))  # a checkpoint directory: BOS and EOS as configured
    assert [d.tolist() for d in framed.encode_documents(["hello world"])] == [[1, 3, 4, 2]]
    assert framed.encode("hello") == [3]  # prompts: no special tokens
    with pytest.raises(ConfigError, match=r"vocabulary of 5 tokens but model.vocab_size=4"):
        check_fits(framed, 4)
    check_fits(framed, 5)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(DOCS * 3), model_prefix=str(tmp_path / "sp"), vocab_size=40,
        model_type="bpe", minloglevel=2)
    sp = load_tokenizer(str(tmp_path / "sp.model"))
    ids = sp.encode_documents(["héllo wörld"])[0]
    assert sp.vocab_size == 40 and sp.decode(ids) == "héllo wörld"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))


def _store_docs(path: str, split: str) -> list[list[int]]:
    s = TokenSplit(path, split)
    tokens = s.read(0, s.num_tokens)
    bounds = list(s.doc_starts) + [s.num_tokens]
    return [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


def test_prepare_exact_tokens_any_worker_count(corpus, tmp_path):
    d, files = corpus
    _word_level(tmp_path / "tok.json", {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(300)}})
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tok.json"))
    spec = ",".join(files)
    serial = prepare(spec, str(tmp_path / "one"), str(tmp_path / "tok.json"), val_fraction=0.2)
    parallel = prepare(spec, str(tmp_path / "two"), str(tmp_path / "tok.json"), val_fraction=0.2,
                       workers=2, batch_bytes=64, chunk_tokens=16)
    assert serial["splits"] == parallel["splits"]
    docs = [doc for p in files for doc in files[p] if doc]
    held = [prepare_store.is_validation(doc, 0.2) for doc in docs]
    assert 0 < sum(held) < len(docs)
    for split, wanted in (("train", False), ("val", True)):
        expected = [e.ids for doc, h in zip(docs, held) if h == wanted
                    for e in [tok.encode(doc, add_special_tokens=False)] if e.ids]
        assert _store_docs(str(tmp_path / "one"), split) == expected
        assert _store_docs(str(tmp_path / "two"), split) == expected
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_prepare_shards_read_as_one_store(corpus, tmp_path):
    d, files = corpus
    spec = ",".join(files)
    out = str(tmp_path / "parts")
    with pytest.raises(InputError, match="more than the 7 input files"):
        prepare(spec, out, num_shards=8, shard_index=0)
    metas = [prepare(spec, out, num_shards=3, shard_index=i, val_fraction=0.2) for i in (2, 0)]
    with pytest.raises(InputError, match="has 2 of its 3 parts; missing part-00001-of-00003"):
        TokenSplit(out, "train")
    metas.append(prepare(spec, out, num_shards=3, shard_index=1, val_fraction=0.2))
    whole = read_metadata(out)
    assert whole["parts"] == 3
    assert whole["splits"]["train"]["num_tokens"] == sum(
        m["splits"]["train"]["num_tokens"] for m in metas)
    ordered = [p for i in range(3) for p in list(files)[i::3]]
    docs = [doc.encode() for p in ordered for doc in files[p]
            if doc and not prepare_store.is_validation(doc, 0.2)]
    got = _store_docs(out, "train")
    assert [bytes(g) for g in got] == docs
    s = TokenSplit(out, "train")
    cut = s._offsets[1]  # a read across the first part boundary
    np.testing.assert_array_equal(s.read(cut - 3, cut + 3),
                                  np.frombuffer(b"".join(docs), np.uint8)[cut - 3:cut + 3])


def test_prepare_failure_or_crash_leaves_no_store(corpus, tmp_path, monkeypatch):
    d, files = corpus
    (tmp_path / "bad.jsonl").write_bytes(_jsonl(DOCS[:3]) + b'{"body": 1}\n')
    spec = f"{d}/a.jsonl,{tmp_path}/bad.jsonl"
    with pytest.raises(InputError, match="bad.jsonl:4"):
        prepare(spec, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    # A killed run leaves its temporary directory: the next run removes it and completes.
    os.makedirs(tmp_path / "out.tmp-abc123" / "train")
    lines = []
    prepare(f"{d}/a.jsonl", str(tmp_path / "out"), log=lines.append)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "out"]
    assert "removed 1 unfinished temporary store" in lines[0]
    with pytest.raises(ConfigError, match="--vocab_size=200"):
        prepare(f"{d}/a.jsonl", str(tmp_path / "x"), vocab_size=200)


def test_missing_library_names_the_extra(corpus, monkeypatch):
    import sys

    _, files = corpus
    for module, suffix in (("zstandard", ".zst"), ("pyarrow.parquet", ".parquet")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        path = next(p for p in files if p.endswith(suffix))
        with pytest.raises(InputError, match=r"needs the `(zstandard|pyarrow)` package: pip "
                                             r"install 'mla-moe\[data\]'"):
            list(read_documents(path))
