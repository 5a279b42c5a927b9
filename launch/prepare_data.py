"""Tokenizes a corpus into a token store for training, streamed and in parallel.

    python -m launch.prepare_data --input='corpus/**/*.txt' --output=/data/store
    python -m launch.prepare_data --input='web/*.parquet,code/*.jsonl.zst' --output=DIR \
        --tokenizer=deepseek-ai/DeepSeek-V3-checkpoint-dir --workers=16
    # host i of N (each tokenizes every N-th file; DIR then trains as one store):
    python -m launch.prepare_data --input=... --output=DIR --num_shards=N --shard_index=i

Inputs (comma-separated globs): .txt and other text files (one document each), .jsonl,
.jsonl.gz, .jsonl.zst (one per line, the `--text_key` field), .parquet (the `--text_key`
column) and .array_record (one per record). See docs/data.md.
"""

from __future__ import annotations

import os

from absl import flags

from launch import cli

_INPUT = flags.DEFINE_string("input", None, "Comma-separated globs of corpus files.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory of the token store to create.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "byte", "'byte', a tokenizer.json, a SentencePiece .model file, or a "
    "HuggingFace checkpoint directory (tokenizer.json + tokenizer_config.json).")
_VAL = flags.DEFINE_float("val_fraction", 0.01, "Share of documents held out for validation "
                          "(chosen by a hash of each document).")
_TEXT_KEY = flags.DEFINE_string("text_key", "text",
                                "Field (.jsonl) or column (.parquet) holding the text.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing store.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: one per core); files are "
                                "the unit of work.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Hosts sharing the work; each writes "
                                   "OUTPUT/part-<shard_index>-of-<num_shards>.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This host's shard, in [0, num_shards).")
_UTF8 = flags.DEFINE_enum("utf8_errors", "strict", ["strict", "replace"],
                          "Invalid UTF-8: 'strict' stops naming the file and byte; 'replace' "
                          "substitutes U+FFFD and counts the replacements.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "The model's vocab_size: refuse a tokenizer with "
                              "more ids (0: no check).")
flags.mark_flags_as_required(["input", "output"])


def main(argv: list[str]) -> None:
    """Tokenises the input files into a token store."""
    from mla_moe.data import prepare
    from mla_moe.errors import InputError

    if not _OUTPUT.value:
        raise InputError("--output is empty; pass the directory of the token store to create")
    workers = _WORKERS.value or len(os.sched_getaffinity(0))
    meta = prepare(
        _INPUT.value, _OUTPUT.value, _TOKENIZER.value, val_fraction=_VAL.value,
        text_key=_TEXT_KEY.value, overwrite=_OVERWRITE.value, workers=workers,
        num_shards=_NUM_SHARDS.value, shard_index=_SHARD_INDEX.value,
        utf8_errors=_UTF8.value, vocab_size=_VOCAB.value, log=lambda s: print(s, flush=True),
    )
    splits = ", ".join(
        f"{name}: {s['num_tokens']:,} tokens in {s['num_docs']:,} documents"
        for name, s in meta["splits"].items()
    )
    replaced = meta.get("utf8_replaced", 0)
    print(f"prepare: wrote {meta['path']} in {meta['seconds']:.1f}s (tokenizer "
          f"{meta['tokenizer']}, vocab {meta['vocab_size']}; {splits}"
          + (f"; {replaced:,} invalid UTF-8 sequences replaced" if replaced else "") + ")",
          flush=True)


if __name__ == "__main__":
    cli.run(main)
