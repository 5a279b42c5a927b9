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

    python bench/data.py --on_the_fly [--raw_mb 24] [--raw_workers 0 1 2] [--batches 40]
                         [--raw_tokenizer=PATH]

measures instead the training pipeline on raw files (`data.path=raw:GLOB`, tokenized on the fly,
`mla_moe.data.raw_source`): a `.jsonl` corpus of RAW_MB in 12 shards, the same BPE (or
`--raw_tokenizer`), windows of 4,096 tokens in local batches of 48 (one v5p host: 4 chips x 12
sequences), for each `data.workers`: the seconds to the first batch (worker start), tokens/s
over the next BATCHES batches, and the CPU seconds per batch of the training process (its
share: receiving, mixing, batching) and of the workers (psutil). Each process's tokenizer is
held to one thread (TOKENIZERS_PARALLELISM=false), so data.workers=0 is one core doing
everything. It then prints what one v5p host consumes for V2-Lite at 12 x 4096 tokens per
chip at the step's roofline bound (model FLOPs per chip over the chip's peak: the fastest the
step can run, so the most data it can ask for) and the cores that rate needs at the measured
tokens per CPU second.
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


HOST_CHIPS, SEQS_PER_CHIP, SEQ_LEN = 4, 12, 4096  # one v5p host, V2-Lite at 12 x 4096


def host_tokens_per_s() -> tuple[float, float]:
    """(tokens/s one v5p host consumes for V2-Lite at 12 x 4096 tokens per chip, the step's
    seconds) at the compute roofline: model FLOPs per chip / the chip's peak bf16 FLOP/s (the
    step is compute-bound there, bench/RESULTS.md "Will it fit?"), so no faster step exists."""
    from configs import deepseek_v2_lite
    from mla_moe import flops_per_token
    from mla_moe.train.config import model_config
    from pallas_kernels import chips

    cfg = model_config(deepseek_v2_lite.get_config())
    step_s = (flops_per_token(cfg, SEQ_LEN) * SEQS_PER_CHIP * SEQ_LEN
              / chips.by_target("v5p").chip_peak_flops)
    return HOST_CHIPS * SEQS_PER_CHIP * SEQ_LEN / step_s, step_s


def _cpu(processes: list) -> float:
    """User + system CPU seconds of `processes` (those still alive)."""
    total = 0.0
    for p in processes:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def on_the_fly(args, work: str, base: str, tokenizer: str) -> None:
    """Tokens/s of the raw-file training pipeline for each worker count (module docstring)."""
    from mla_moe.data import PipelineConfig, train_iterator
    from mla_moe.data.raw_source import RawSource

    corpus = os.path.join(work, f"raw-{args.raw_mb}mb")
    if not os.path.isdir(corpus):
        global SHARD_BYTES
        SHARD_BYTES = (args.raw_mb << 20) // 12 + 1
        write_corpus(corpus, "jsonl", args.raw_mb, base)
    tokenizer = args.raw_tokenizer or tokenizer
    source = RawSource(f"raw:{corpus}/shard-*", tokenizer)
    batch_tokens = HOST_CHIPS * SEQS_PER_CHIP * SEQ_LEN
    rows = []
    for workers in args.raw_workers:
        cfg = PipelineConfig(seq_len=SEQ_LEN, global_batch=HOST_CHIPS * SEQS_PER_CHIP,
                             seed=0, workers=workers, prefetch=2)
        start = time.perf_counter()
        it = train_iterator(source, cfg)
        next(it)
        first = time.perf_counter() - start
        children = psutil.Process().children(recursive=True)
        start, cpu, kids = time.perf_counter(), time.process_time(), _cpu(children)
        for _ in range(args.batches):
            next(it)
        seconds = time.perf_counter() - start
        main_cpu = (time.process_time() - cpu) / args.batches
        worker_cpu = (_cpu(children) - kids) / args.batches
        it.close()
        rate = args.batches * batch_tokens / seconds
        rows.append((workers, first, rate, main_cpu, worker_cpu))
        print(f"data.workers={workers}: first batch {first:.1f} s, then {rate / 1e3:.0f}K tok/s "
              f"over {args.batches} batches of {batch_tokens:,} tokens", flush=True)
    need, step_s = host_tokens_per_s()
    # One tokenizing process's rate: data.workers=1 (the main process packs), else 0.
    # The per-core rate: tokens per CPU second of one process doing everything (data.workers=0),
    # which other jobs on a shared host do not change as they change the wall-clock rates.
    per_core = next((batch_tokens / cpu for w, _, _, cpu, _ in rows if w == 0),
                    max(r[2] for r in rows))
    print("\n| data.workers | first batch s | tokens/s | CPU s per batch: training process "
          "| workers | tokens per CPU s |")
    print("|---|---|---|---|---|---|")
    for workers, first, rate, main_cpu, worker_cpu in rows:
        print(f"| {workers} | {first:.1f} | {rate / 1e3:.0f}K | {main_cpu:.3f} | "
              f"{worker_cpu:.3f} | {batch_tokens / (main_cpu + worker_cpu) / 1e3:.0f}K |")
    print(f"\nV2-Lite on one v5p host (4 chips x 12 x 4096 tokens) at the compute bound "
          f"{step_s:.2f} s/step: {need / 1e3:.0f}K tokens/s; at {per_core / 1e3:.0f}K tokens "
          f"per CPU second (data.workers=0, this BPE) that is {need / per_core:.2f} cores: "
          f"data.workers={math.ceil(need / per_core)} keeps up with a margin of "
          f"{math.ceil(need / per_core) * per_core / need:.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[150, 600])
    parser.add_argument("--formats", nargs="+", default=["jsonl"],
                        choices=["jsonl", "parquet", "zst"])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--keep_dir", default="")
    parser.add_argument("--on_the_fly", action="store_true",
                        help="measure the raw-file training pipeline instead of prepare_data")
    parser.add_argument("--raw_mb", type=int, default=24)
    parser.add_argument("--raw_workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--raw_tokenizer", default="",
                        help="--on_the_fly with this tokenizer (e.g. a DeepSeek checkpoint "
                             "directory) instead of the bench's BPE")
    args = parser.parse_args()
    if args.on_the_fly:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per tokenizing process
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
    if args.on_the_fly:
        on_the_fly(args, work, base, tokenizer)
        return
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
