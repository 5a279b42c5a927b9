"""Tokenizers: a built-in byte-level one, and HuggingFace `tokenizer.json` / SentencePiece files.

Every tokenizer has `vocab_size`, `encode(text) -> list[int]`, `decode(ids) -> str` and a
`spec` string that `load_tokenizer` accepts again (recorded in the token store's metadata).
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Iterable

from mla_moe.errors import InputError, MissingInputError


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no special tokens, needs no file."""

    spec = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return list(text.encode("utf-8"))

    def encode_bytes(self, text: str) -> bytes:
        """Same ids as `encode`, as a bytes object (the fast path for large corpora)."""
        return text.encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (integers of any kind)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _optional_package(name: str, path: str) -> types.ModuleType:
    """The package `name` that reading the tokenizer file `path` needs, or a clear error."""
    try:
        return importlib.import_module(name)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError(f"tokenizer {path!r} needs the `{name}` package: pip install {name}"
                         ) from e


class HFTokenizer:
    """A HuggingFace `tokenizer.json` file, through the optional `tokenizers` package."""

    def __init__(self, path: str):
        tokenizers = _optional_package("tokenizers", path)
        self.spec = os.path.abspath(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own exception type
            raise InputError(f"tokenizer {path!r} is not a HuggingFace tokenizer.json "
                             f"({_first_line(e)})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (integers of any kind)."""
        return self._tok.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A SentencePiece `.model` file, through the optional `sentencepiece` package."""

    def __init__(self, path: str):
        sentencepiece = _optional_package("sentencepiece", path)
        self.spec = os.path.abspath(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise InputError(f"tokenizer {path!r} is not a SentencePiece model "
                             f"({_first_line(e)})") from None
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (integers of any kind)."""
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer | SentencePieceTokenizer:
    """`"byte"`, a `tokenizer.json` path, or a SentencePiece `.model` path."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise MissingInputError(f"tokenizer: no such file {spec!r}; pass 'byte', a "
                                "tokenizer.json or a SentencePiece .model file")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise InputError(f"tokenizer: expected 'byte', a tokenizer.json or a .model file, got {spec!r}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
