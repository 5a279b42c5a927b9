"""Mixtures of token stores: the exact token stream against a slow pure-Python reference,
process slices, resume from the iterator's state, and bad weights."""

import grain
import numpy as np
import pytest
from train_helpers import assert_iterator_resumes, reference_window

from mla_moe.data import PipelineConfig, TokenSplit, eval_batches, train_iterator, write_store
from mla_moe.data import mixture as mixture_lib
from mla_moe.data.pipeline import source_seed
from mla_moe.errors import ConfigError


def _make_docs(seed, n, offset):
    rng = np.random.default_rng(seed)
    return [[offset + int(t) for t in rng.integers(0, 50, int(rng.integers(3, 40)))]
            for _ in range(n)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    out = []
    for s, (n, offset) in enumerate([(30, 0), (12, 100), (20, 200)]):
        docs = _make_docs(s, n, offset)
        path = str(d / f"src{s}")
        write_store(path, {"train": docs, "val": docs[:3]}, tokenizer="byte", vocab_size=256)
        out.append((path, docs))
    return out


def reference_examples(docs_by_source, weights, seed, seq_len, positions, period):
    """Global examples at `positions`, computed slowly from Python lists (no token store, no
    schedule object): the period's composition by largest remainder, its order from
    default_rng([seed, period]).permutation, a running count per source, and windows packed
    by walking document boundaries."""
    exact = [w * period for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in by_remainder[: period - sum(counts)]:
        counts[s] += 1
    streams, seen, out, order = [], [0] * len(weights), {}, []
    for docs in docs_by_source:
        flat, doc_of = [], []
        for k, doc in enumerate(docs):
            flat += doc
            doc_of += [k] * len(doc)
        streams.append((flat, doc_of))
    windows = [grain.MapDataset.range((len(f) - 1) // seq_len).shuffle(seed=source_seed(seed, s))
               .repeat(None) for s, (f, _) in enumerate(streams)]
    for g in range(max(positions) + 1):
        if g % period == 0:
            slots = [s for s in range(len(weights)) for _ in range(counts[s])]
            perm = np.random.default_rng([seed, g // period]).permutation(period)
            order = [slots[int(i)] for i in perm]
        s = order[g % period]
        j, seen[s] = seen[s], seen[s] + 1
        if g not in positions:
            continue
        flat, doc_of = streams[s]
        start = windows[s][j] * seq_len
        out[g] = reference_window(flat[start:start + seq_len + 1],
                                  doc_of[start:start + seq_len + 1])
    return out


def test_mixture_stream_matches_reference(sources, monkeypatch):
    monkeypatch.setattr(mixture_lib, "PERIOD", 16)  # several periods, and epochs of each source
    weights = mixture_lib.parse_weights("a,b,c", "5,2,3")
    mix = mixture_lib.TokenMixture([TokenSplit(p, "train") for p, _ in sources], weights)
    G, T, steps, seed = 6, 8, 12, 7
    iters = [train_iterator(mix, PipelineConfig(T, G, seed=seed, process_index=p,
                                                process_count=2)) for p in range(2)]
    ref = reference_examples([d for _, d in sources], weights, seed, T, set(range(G * steps)),
                             16)
    for k in range(steps):
        for p, it in enumerate(iters):
            batch = next(it)
            for row in range(G // 2):
                expected = ref[k * G + p * (G // 2) + row]
                for key, value in expected.items():
                    np.testing.assert_array_equal(batch[key][row], value, err_msg=f"{k} {key}")
    # Exact shares per period: 5/10, 2/10, 3/10 of 16 slots -> 8, 3, 5.
    np.testing.assert_array_equal(mixture_lib.period_counts(weights, 16), [8, 3, 5])
    first = np.array([t for g in range(64) for t in ref[g]["inputs"][:1]]) // 100
    np.testing.assert_array_equal(np.bincount(first, minlength=3), [32, 12, 20])


def test_mixture_resumes_from_iterator_state(sources):
    mix = mixture_lib.open_split([p for p, _ in sources], "train", [0.5, 0.25, 0.25])
    cfg = PipelineConfig(seq_len=8, global_batch=4, seed=1, num_threads=2)
    assert_iterator_resumes(mix, cfg, skip=7)
    val = mixture_lib.open_split([p for p, _ in sources], "val", [0.5, 0.25, 0.25])
    a, b = eval_batches(val, cfg, 2), eval_batches(val, cfg, 2)
    np.testing.assert_array_equal(a[1]["inputs"], b[1]["inputs"])
    assert {int(x) // 100 for x in a[0]["inputs"][:, 0]} <= {0, 1, 2}


def test_one_source_is_the_plain_stream(sources):
    path = sources[0][0]
    cfg = PipelineConfig(seq_len=8, global_batch=4, seed=3)
    plain = train_iterator(TokenSplit(path, "train"), cfg)
    opened = train_iterator(mixture_lib.open_split([path], "train", [1.0]), cfg)
    for _ in range(3):
        np.testing.assert_array_equal(next(plain)["inputs"], next(opened)["inputs"])


@pytest.mark.parametrize("path,weights,message", [
    ("a,b", "1,2,3", r"data.weights has 3 values for the 2 sources of data.path='a,b'"),
    ("", "0.5,0.5", r"data.weights has 2 values for the 1 source of"),
    ("a,b", "1,x", r"data.weights='1,x' must be comma-separated numbers"),
    ("a,b", "1,-1", r"data.weights must all be positive"),
    ("a,b", "1,0.00001", r"below 1/4096"),
])
def test_bad_weights(path, weights, message):
    with pytest.raises(ConfigError, match=message):
        mixture_lib.parse_weights(path, weights)



def test_run_config_refuses_mismatched_weights_before_compute():
    from train_helpers import micro_config

    from mla_moe.train import config as config_lib

    config = micro_config("/data/web,/data/code")
    config.data.weights = "1"
    with pytest.raises(ConfigError, match="data.weights has 1 value for the 2 sources"):
        config_lib.validate(config)
