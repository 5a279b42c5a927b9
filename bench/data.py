"""`launch.prepare_data` at two corpus sizes: peak memory of its process tree, and tokens/s
against `tokenizers`' own `encode_batch` over the same documents in memory.

    python bench/data.py [--sizes_mb 150 600] [--workers=2] [--formats jsonl parquet]
                         [--vocab=4096] [--keep_dir=DIR]

The corpora are synthetic and written to a temporary directory: documents are random slices
(200 B to 20 KB, log-uniform) of the Python standard library's source, as shards of about
64 MB of `.jsonl` (or `.parquet` / `.jsonl.zst`). The tokenizer is a byte-level BPE of VOCAB
ids trained on a 4 MB sample, saved as a tokenizer.json. For each corpus:

1. baseline: the documents read into memory, then `Tokenizer.encode_batch` over batches of
   4,096 documents (all cores, Rayon); tokens counted from the encodings; timed without the
   reading.
2. prepare: `python -m launch.prepare_data --workers=WORKERS` as a subprocess; the RSS of it
   and its children, summed, sampled every 50 ms (peak reported); tokens/s from the time
   prepare reports for itself (its "wrote ... in Ns" line: reading, tokenizing, writing) and,
   for reference, from the whole command (interpreter and jax import included).

Token counts must be equal (store train + val against the baseline); the script exits 1 if not.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_BYTES = 64 << 20


def stdlib_text() -> str:
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n".join(parts)


def documents(base: str, total_bytes: int, seed: int):
    """Random slices of `base` (log-uniform 200 B - 20 KB) until `total_bytes` characters."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < total_bytes:
        lengths = np.exp(rng.uniform(math.log(200), math.log(20_000), 4096)).astype(int)
        starts = rng.integers(0, len(base) - 20_001, 4096)
        for a, n in zip(starts, lengths):
            yield base[a:a + n]
            made += n
            if made >= total_bytes:
                return


def write_corpus(directory: str, fmt: str, size_mb: int, base: str) -> list[str]:
    os.makedirs(directory)
    paths, shard, shard_bytes = [], [], 0

    def flush():
        path = os.path.join(directory, f"shard-{len(paths):04d}." + {
            "jsonl": "jsonl", "parquet": "parquet", "zst": "jsonl.zst"}[fmt])
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": shard}), path, row_group_size=2048)
        else:
            data = "".join(json.dumps({"text": d}) + "\n" for d in shard).encode()
            if fmt == "zst":
                import zstandard

                data = zstandard.ZstdCompressor(level=3).compress(data)
            with open(path, "wb") as f:
                f.write(data)
        paths.append(path)

    for doc in documents(base, size_mb << 20, seed=size_mb):
        shard.append(doc)
        shard_bytes += len(doc)
        if shard_bytes >= SHARD_BYTES:
            flush()
            shard, shard_bytes = [], 0
    if shard:
        flush()
    return paths


def read_back(paths: list[str]) -> list[str]:
    from mla_moe.data import read_documents

    return [d for p in paths for d in read_documents(p) if d]


def train_tokenizer(base: str, vocab: int, path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(documents(base, 4 << 20, seed=1)), trainer)
    tok.save(path)


def baseline(tokenizer_path: str, docs: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of encode_batch over `docs` in batches of 4096."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(docs), 4096):
        tokens += sum(len(e.ids) for e in tok.encode_batch(docs[i:i + 4096],
                                                           add_special_tokens=False))
    return tokens, time.perf_counter() - start


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_prepare(inputs: str, output: str, tokenizer: str, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), ROOT]),
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "launch.prepare_data", f"--input={inputs}",
           f"--output={output}", f"--tokenizer={tokenizer}", f"--workers={workers}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"prepare_data failed:\n{err[-2000:]}")
    seconds = float(re.search(r"wrote .* in ([\d.]+)s", out).group(1))
    from mla_moe.data import read_metadata

    meta = read_metadata(output)
    tokens = sum(s["num_tokens"] for s in meta["splits"].values())
    return {"tokens": tokens, "seconds": seconds, "wall": wall, "peak_gib": peak / 2**30,
            "lines": out.strip().splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[150, 600])
    parser.add_argument("--formats", nargs="+", default=["jsonl"],
                        choices=["jsonl", "parquet", "zst"])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--keep_dir", default="")
    args = parser.parse_args()
    sys.path[:0] = [os.path.join(ROOT, "src"), ROOT]
    work = args.keep_dir or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(work, exist_ok=True)
    base = stdlib_text()
    tokenizer = os.path.join(work, "tokenizer.json")
    if not os.path.exists(tokenizer):
        train_tokenizer(base, args.vocab, tokenizer)
    cpu = platform.processor() or platform.machine()
    print(f"{datetime.date.today()} | {platform.node()} | {cpu} | {os.cpu_count()} cores | "
          f"load {os.getloadavg()[0]:.1f} | workers {args.workers} "
          f"| BPE vocab {args.vocab} | {work}")
    rows, ok = [], True
    for fmt in args.formats:
        for size in args.sizes_mb:
            corpus = os.path.join(work, f"{fmt}-{size}mb")
            if not os.path.isdir(corpus):
                write_corpus(corpus, fmt, size, base)
            files = sorted(glob.glob(os.path.join(corpus, "shard-*")))
            disk_mb = sum(os.path.getsize(p) for p in files) / 2**20
            docs = read_back(files)
            text_mb = sum(len(d.encode()) for d in docs) / 2**20
            base_tokens, base_s = baseline(tokenizer, docs)
            del docs
            store = os.path.join(work, f"store-{fmt}-{size}")
            subprocess.run(["rm", "-rf", store], check=True)
            r = run_prepare(os.path.join(corpus, "shard-*"), store, tokenizer, args.workers)
            subprocess.run(["rm", "-rf", store], check=True)
            ok &= r["tokens"] == base_tokens
            rows.append((fmt, size, disk_mb, text_mb, len(files), base_tokens, base_s, r))
            print(f"{fmt} {size} MB: {r['lines'][0]}\n  {r['lines'][-1]}", flush=True)
    print("\n| corpus | files | text MB | tokens | encode_batch tok/s | prepare tok/s | ratio "
          "| prepare, whole command | peak RSS, process tree | token counts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt, _, disk_mb, text_mb, n, base_tokens, base_s, r in rows:
        print(f"| {fmt}, {disk_mb:.0f} MB on disk | {n} | {text_mb:.0f} | {r['tokens']:,} | "
              f"{base_tokens / base_s / 1e6:.2f}M | {r['tokens'] / r['seconds'] / 1e6:.2f}M | "
              f"{base_s / r['seconds']:.2f}x | {r['wall']:.0f} s "
              f"({r['tokens'] / r['wall'] / 1e6:.2f}M tok/s) | {r['peak_gib']:.2f} GiB | "
              f"{'equal' if r['tokens'] == base_tokens else 'DIFFER: ' + str(base_tokens)} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
