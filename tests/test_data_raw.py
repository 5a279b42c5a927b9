"""Raw files tokenized on the fly (`raw:GLOB` in data.path): the packed stream against a slow
pure-Python reference (one process, process slices, worker processes), resume from the
iterator's state and through the trainer's checkpoints, a mixture with a token store, and bad
inputs."""

import dataclasses
import json
import os

import numpy as np
import pytest
from train_helpers import micro_config, reference_window, synthetic_store

from mla_moe.data import PipelineConfig, TokenSplit, train_iterator
from mla_moe.data import mixture as mixture_lib
from mla_moe.data.pipeline import _window_orders, pack_window, source_seed
from mla_moe.data.raw_source import RawSource
from mla_moe.errors import ConfigError, InputError

SEQ_LEN = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three .jsonl files of random words (one empty document), byte-tokenized."""
    d = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "é", "✓", "x"]
    for f in range(3):
        docs = [" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(15 + 5 * f)]
        docs[3] = ""
        with open(d / f"part{f}.jsonl", "w", encoding="utf-8") as fh:
            fh.write("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)))
    return str(d)


def reference_windows(corpus_dir, seed, visits, count, seq_len=SEQ_LEN):
    """The first `count` windows read over file visits `visits` (an iterator of global visit
    indices), computed slowly: each visit's file by default_rng([seed, epoch]).permutation of
    the sorted files, its documents' UTF-8 bytes in line order (empty ones dropped),
    concatenated, cut at stride seq_len, segments and positions by walking the documents."""
    files = sorted(os.path.join(corpus_dir, f) for f in os.listdir(corpus_dir))
    flat, doc_of, doc_id = [], [], 0
    out = []
    for k in visits:
        order = np.random.default_rng([seed, k // len(files)]).permutation(len(files))
        with open(files[order[k % len(files)]], encoding="utf-8") as fh:
            for line in fh:
                tokens = list(json.loads(line)["text"].encode("utf-8"))
                if tokens:
                    flat += tokens
                    doc_of += [doc_id] * len(tokens)
                    doc_id += 1
        while len(out) < count and len(out) * seq_len + seq_len + 1 <= len(flat):
            start = len(out) * seq_len
            out.append(reference_window(flat[start:start + seq_len + 1],
                                        doc_of[start:start + seq_len + 1]))
        if len(out) == count:
            return out
    raise AssertionError("visits ran out")


def _take(it, batches):
    rows = []
    for _ in range(batches):
        batch = next(it)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["inputs"]))]
    return rows


def _assert_rows_equal(got, want):
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want)):
        for key in w:
            np.testing.assert_array_equal(g[key], np.asarray(w[key], g[key].dtype),
                                          err_msg=f"example {n}, {key}")


def _visits(start, step):
    k = start
    while True:
        yield k
        k += step


@pytest.mark.parametrize("process_count", [1, 2])
def test_stream_matches_reference(corpus, process_count):
    source = RawSource(f"raw:{corpus}/*.jsonl", "byte")
    for p in range(process_count):
        cfg = PipelineConfig(seq_len=SEQ_LEN, global_batch=4, seed=3, process_index=p,
                             process_count=process_count, prefetch=0)
        L = cfg.local_batch
        got = _take(train_iterator(source, cfg), 30 // L)  # several epochs of the 3 files
        want = reference_windows(corpus, 3, _visits(p, process_count), len(got))
        _assert_rows_equal(got, want)


def test_workers_interleave_and_resume(corpus):
    """Two worker processes: worker w packs visits w, w + 2, ... and the process takes their
    windows in turn; restored to a saved state (the workers are told it), the iterator
    continues exactly. (A fresh iterator would start two more processes, seconds each.)"""
    source = RawSource(f"raw:{corpus}/*.jsonl", "byte")
    cfg = PipelineConfig(seq_len=SEQ_LEN, global_batch=2, seed=5, workers=2)
    it = train_iterator(source, cfg)
    got = _take(it, 5)
    state = it.get_state()
    expected = _take(it, 3)
    per_worker = [reference_windows(corpus, 5, _visits(w, 2), 5) for w in range(2)]
    _assert_rows_equal(got, [per_worker[i % 2][i // 2] for i in range(10)])
    it.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    _assert_rows_equal(_take(it, 3), expected)
    it.close()


@pytest.mark.parametrize("skip", [0, 1, 7, 20])
def test_resume_from_any_position(corpus, skip):
    source = RawSource(f"raw:{corpus}/*.jsonl", "byte")
    cfg = PipelineConfig(seq_len=SEQ_LEN, global_batch=3, seed=1, prefetch=2)
    it = train_iterator(source, cfg)
    _take(it, skip)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = train_iterator(source, cfg)
    fresh.set_state(json.loads(json.dumps(state)))
    _assert_rows_equal(_take(fresh, 4), expected)


def test_mixture_with_a_store(corpus, tmp_path):
    """Store slots hold the store's windows as in a store-only mixture; raw slots hold the raw
    stream in order."""
    store = TokenSplit(synthetic_store(str(tmp_path / "store"), num_docs=12), "train")
    raw = RawSource(f"raw:{corpus}/*.jsonl", "byte")
    weights = [0.5, 0.5]
    cfg = PipelineConfig(seq_len=SEQ_LEN, global_batch=4, seed=2, prefetch=0)
    got = _take(train_iterator(mixture_lib.TokenMixture([store, raw], weights), cfg), 6)
    schedule = mixture_lib.Schedule(weights, 2)
    raw_rows = iter(_take(train_iterator(raw, dataclasses.replace(cfg, seed=source_seed(2, 1))),
                          6))
    order = _window_orders([store], cfg)[0]  # the store's window order (source 0's seed)
    for g, row in enumerate(got):
        s, j = schedule.slot(g)
        want = pack_window(store, order[j] * SEQ_LEN, SEQ_LEN) if s == 0 else next(raw_rows)
        _assert_rows_equal([row], [want])


def test_damaged_file_names_file_and_line(tmp_path):
    lines = [json.dumps({"text": f"document {i} " * 3}) for i in range(10)]
    lines[6] = '{"text": "cut off'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    source = RawSource(f"raw:{tmp_path}/*.jsonl", "byte", sample_chars=50)
    it = train_iterator(source, PipelineConfig(seq_len=SEQ_LEN, global_batch=2, prefetch=0))
    with pytest.raises(InputError, match=r"bad\.jsonl:7: expected a JSON object .*data\.text_key"):
        _take(it, 20)


@pytest.mark.parametrize("data,train,message", [
    (dict(path="raw:/x/*.jsonl"), {}, r"data\.tokenizer is required for the raw source"),
    (dict(path="raw:/x/*.jsonl", tokenizer="byte"), dict(eval_batches=2),
     r"train\.eval_batches=2: raw sources have no validation split"),
    (dict(path="raw:", tokenizer="byte"), {}, r"data\.path entry 'raw:' names no files"),
    (dict(path="raw:/x/*.jsonl", tokenizer="byte", workers=-1), {},
     r"data\.workers must be an integer >= 0"),
])
def test_config_refuses_before_compute(data, train, message):
    from mla_moe.train import config as config_lib

    config = micro_config(train={"eval_batches": 0, **train}, data=data)
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_glob_without_prefix_or_no_match(tmp_path):
    from mla_moe.train import setup

    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(InputError, match=r"is a file, not a token store; to train on raw files "
                                         r"write raw:"):
        setup._resolve_data(str(tmp_path / "a.jsonl"))
    with pytest.raises(InputError, match=r"'raw:/nonexistent/\*\.jsonl': --input="):
        RawSource("raw:/nonexistent/*.jsonl", "byte")


def test_run_data_checkpoints_with_the_state(corpus, tmp_path):
    """The run's data (`setup.open_data` of a raw config) saved by the trainer's Checkpointer
    beside a state, and restored into a freshly opened run, continues with the same batches:
    what a resume after SIGTERM or kill -9 reads (the trainer's own resume tests cover the
    rest of the loop)."""
    import jax
    import jax.numpy as jnp

    from mla_moe.train import checkpoint as ckpt_lib
    from mla_moe.train import config as config_lib
    from mla_moe.train import setup

    config = micro_config(f"raw:{corpus}/*.jsonl", train=dict(eval_batches=0),
                          data=dict(tokenizer="byte", workers=0),
                          checkpoint=dict(async_save=False))
    cfg = config_lib.validate(config)
    data = setup.open_data(config, cfg)
    assert data.val == [] and f"{data.train.num_tokens:,}".replace(",", "").isdigit()
    _take(data.iterator, 3)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
    state = {"step": jnp.array(3, jnp.int32)}
    ckpt.save(3, state, data.iterator, force=True)
    ckpt.wait()
    expected = _take(data.iterator, 3)
    fresh = setup.open_data(config, cfg)
    restored = ckpt.restore(3, jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=a.sharding), state), fresh.iterator)
    ckpt.close()
    assert int(restored["step"]) == 3
    _assert_rows_equal(_take(fresh.iterator, 3), expected)
