"""Tokenizers: a built-in byte-level one, a HuggingFace `tokenizer.json`, a SentencePiece
`.model`, and a HuggingFace checkpoint directory (`tokenizer.json` + `tokenizer_config.json`).

Every tokenizer has `vocab_size` (largest id + 1), `encode(text) -> list[int]` (no special
tokens), `encode_documents(texts, dtype) -> list[np.ndarray]` (each document framed as the
tokenizer's config says: BOS/EOS for a checkpoint directory, nothing otherwise), `decode(ids)`
and a `spec` string that `load_tokenizer` accepts again (recorded in the token store).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from mla_moe.data import extras
from mla_moe.errors import ConfigError, InputError, MissingInputError


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

    def encode_documents(self, texts: Sequence[str], dtype=np.uint8) -> list[np.ndarray]:
        """Each document's ids as an array of `dtype`."""
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(dtype, copy=False)
                for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (integers of any kind)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HuggingFace `tokenizer.json` (the `tokenizers` package), alone or in a checkpoint
    directory whose `tokenizer_config.json` says how documents are framed: BOS first when
    `add_bos_token` (default: true when it names a `bos_token`), EOS last when `add_eos_token`
    (default: false)."""

    def __init__(self, path: str):
        tokenizers = extras.require("tokenizers", f"tokenizer {path!r}")
        self.spec = os.path.abspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the Rust library raises its own exception type
            raise InputError(f"tokenizer {file!r} is not a HuggingFace tokenizer.json "
                             f"({_first_line(e)})") from None
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id = self.eos_id = None
        if os.path.isdir(path):
            self.bos_id, self.eos_id = self._framing(os.path.join(path, "tokenizer_config.json"))

    def _framing(self, config_path: str) -> tuple[int | None, int | None]:
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            return None, None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{config_path} is not valid JSON ({e})") from None
        ids = []
        for name in ("bos", "eos"):
            token = config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            wanted = config.get(f"add_{name}_token", name == "bos" and token is not None)
            if not wanted:
                ids.append(None)
                continue
            token_id = self._tok.token_to_id(token) if isinstance(token, str) else None
            if token_id is None:
                raise InputError(f"{config_path}: add_{name}_token is set but its {name}_token "
                                 f"{token!r} is not in tokenizer.json")
            ids.append(token_id)
        return ids[0], ids[1]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: Sequence[str], dtype=np.uint32) -> list[np.ndarray]:
        """Each document's ids (framed with BOS/EOS as configured), in one batched call."""
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.eos_id is None else [self.eos_id]
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # >= 0.20
        encodings = encode(list(texts), add_special_tokens=False)
        if head or tail:
            return [np.array(head + e.ids + tail, dtype) for e in encodings]
        return [np.array(e.ids, dtype) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (integers of any kind)."""
        return self._tok.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A SentencePiece `.model` file, through the optional `sentencepiece` package."""

    def __init__(self, path: str):
        sentencepiece = extras.require("sentencepiece", f"tokenizer {path!r}")
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

    def encode_documents(self, texts: Sequence[str], dtype=np.uint32) -> list[np.ndarray]:
        """Each document's ids, in one batched call."""
        return [np.array(ids, dtype) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (integers of any kind)."""
        return self._sp.decode([int(i) for i in ids])


Tokenizer = ByteTokenizer | HFTokenizer | SentencePieceTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"`, a `tokenizer.json` path, a SentencePiece `.model` path, or a HuggingFace
    checkpoint directory (its tokenizer.json, or else its tokenizer.model)."""
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            return HFTokenizer(spec)
        if os.path.isfile(os.path.join(spec, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(spec, "tokenizer.model"))
        raise MissingInputError(f"tokenizer: directory {spec!r} has no tokenizer.json or "
                                "tokenizer.model")
    if not os.path.isfile(spec):
        raise MissingInputError(f"tokenizer: no such file {spec!r}; pass 'byte', a "
                                "tokenizer.json, a SentencePiece .model file or a HuggingFace "
                                "checkpoint directory")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise InputError(f"tokenizer: expected 'byte', a tokenizer.json, a .model file or a "
                     f"checkpoint directory, got {spec!r}")


def check_fits(tokenizer: Tokenizer, vocab_size: int, field: str = "model.vocab_size") -> None:
    """A ConfigError unless every id of `tokenizer` is below `vocab_size` (the embedding's
    rows): raised before any data is read or any step compiled."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.spec} has a vocabulary of {tokenizer.vocab_size} tokens but "
            f"{field}={vocab_size}; use a smaller tokenizer or set {field} >= "
            f"{tokenizer.vocab_size}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
