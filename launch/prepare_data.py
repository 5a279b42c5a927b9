"""Tokenizes text into a token store for training.

    python -m launch.prepare_data --input='corpus/**/*.txt' --output=/data/store
    python -m launch.prepare_data --input=docs.jsonl --output=DIR --tokenizer=tokenizer.json

Text files give one document each; `.jsonl` files one per line (the `--text_key` field).
"""

from __future__ import annotations

from absl import flags

from launch import cli

_INPUT = flags.DEFINE_string("input", None, "Glob of text files, or .jsonl file(s).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory of the token store to create.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte",
                                 "'byte', a tokenizer.json, or a SentencePiece .model file.")
_VAL = flags.DEFINE_float("val_fraction", 0.01, "Share of documents held out for validation.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "Field holding the text in .jsonl lines.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing store.")
flags.mark_flags_as_required(["input", "output"])


def main(argv: list[str]) -> None:
    """Tokenises the input files into a token store."""
    import os

    from mla_moe.data import prepare
    from mla_moe.errors import ExistingOutputError, InputError

    if not _OUTPUT.value:
        raise InputError("--output is empty; pass the directory of the token store to create")
    if os.path.exists(_OUTPUT.value) and not _OVERWRITE.value:  # before reading any input
        raise ExistingOutputError(f"--output={_OUTPUT.value!r} already exists; choose another "
                                  "path or pass --overwrite")
    meta = prepare(_INPUT.value, _OUTPUT.value, _TOKENIZER.value, val_fraction=_VAL.value,
                   text_key=_TEXT_KEY.value, overwrite=_OVERWRITE.value)
    splits = ", ".join(
        f"{name}: {s['num_tokens']:,} tokens in {s['num_docs']:,} documents"
        for name, s in meta["splits"].items()
    )
    print(f"wrote {_OUTPUT.value} (tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']}; "
          f"{splits})")


if __name__ == "__main__":
    cli.run(main)
