"""Documents from corpus files: which files an `--input` names, what format each is, and a
streaming reader for each format.

    files = expand_inputs("web/*.parquet,code/**/*.jsonl.zst")
    for text in read_documents(files[0], text_key="text"):
        ...

Formats, by suffix and checked against the file's first bytes (magic numbers), so compressed or
columnar data is never read as text:

    .jsonl / .json          one JSON object per line, the text under `text_key`
    .jsonl.gz, .jsonl.zst   the same, compressed (gzip: stdlib; zstd: `zstandard`)
    .parquet                the `text_key` column, one row group in memory at a time (`pyarrow`)
    .array_record           one document per record, UTF-8 (`array_record`, installed with grain)
    anything else           a text file: one document (.txt, .py, .md, ...); also .txt.gz/.zst

A file whose bytes are compressed or binary in a way its name does not say is an error naming it.
Invalid UTF-8 is an error naming the file and byte (line, row or record) unless
`utf8_errors="replace"`, which replaces each bad sequence with U+FFFD and counts it
(`REPLACED`, reported by `launch.prepare_data`). A file that fails part way (a truncated
compressed stream, a damaged Parquet page or ArrowRecord chunk, a JSON line without the text)
raises `read_errors.DataReadError`, which names the file and carries the line, row or record.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator

from mla_moe import paths
from mla_moe.data import extras
from mla_moe.data.read_errors import DataReadError
from mla_moe.errors import InputError, MissingInputError

MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PAR1": "parquet",
    b"\x83\xaf\x70\xd1\x0d\x88\x4a\x3f": "array_record",  # a Riegeli file's signature
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"PK\x03\x04": "zip",
    b"7z\xbc\xaf\x27\x1c": "7z",
}
SUPPORTED = ".txt (any text), .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .array_record"
UTF8_ERRORS = ("strict", "replace")
_SNIFF_BYTES = 1 << 16

# Invalid UTF-8 sequences replaced (utf8_errors="replace") in this process.
REPLACED = 0


def _count_and_replace(error: UnicodeDecodeError):
    global REPLACED
    REPLACED += 1
    return "\ufffd", error.end


codecs.register_error("mla_moe.count_replace", _count_and_replace)


def expand_inputs(spec: str) -> list[str]:
    """The files named by comma-separated globs (`**` recurses; gs:// URLs through epath),
    sorted within each glob, each file once. A glob that matches no file is an error."""
    out, seen = [], set()
    for pattern in (p.strip() for p in (spec or "").split(",")):
        if not pattern:
            continue
        found = _glob_url(pattern) if paths.is_url(pattern) else sorted(
            p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
        )
        if not found:
            raise MissingInputError(
                f"--input={pattern!r} matches no files; give files, globs such as "
                "'dir/**/*.jsonl.zst', or several of them separated by commas"
            )
        for p in found:
            if p not in seen:
                seen.add(p)
                out.append(p)
    if not out:
        raise MissingInputError("--input is empty; give files or globs of " + SUPPORTED)
    return out


def _glob_url(pattern: str) -> list[str]:
    parts = pattern.split("/")
    first = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    base = paths.resolve("/".join(parts[:first]))
    if first == len(parts):
        return [str(base)] if base.is_file() else []
    return sorted(str(p) for p in base.glob("/".join(parts[first:])) if p.is_file())


def detect_format(path: str) -> tuple[str, str]:
    """(container, compression) of `path`: container in {"text", "jsonl", "parquet",
    "array_record"}, compression in {"", "gzip", "zstd"}; an unsupported or mislabelled binary
    file is an InputError naming it."""
    with paths.resolve(path).open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    magic = next((kind for m, kind in MAGIC.items() if head.startswith(m)), "")
    name = os.path.basename(path).lower()
    stem, suffix = name, ""
    for ext, kind in ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd")):
        if name.endswith(ext):
            stem, suffix = name[: -len(ext)], kind
    if magic in ("bzip2", "xz", "zip", "7z"):
        raise InputError(f"{path}: {magic}-compressed input is not supported; recompress it "
                         f"as gzip or zstd, or give one of {SUPPORTED}")
    if magic in ("parquet", "array_record"):
        return magic, ""
    if name.endswith(".parquet") or name.endswith((".array_record", ".arrayrecord")):
        raise InputError(f"{path}: named as {name.rsplit('.', 1)[1]} but its first bytes are "
                         "not; the file is truncated or not that format")
    if suffix and magic != suffix:
        raise InputError(f"{path}: named as {suffix} but its first bytes are not "
                         f"{suffix}-compressed; the file is damaged or misnamed")
    compression = magic if magic in ("gzip", "zstd") else ""
    container = "jsonl" if stem.endswith((".jsonl", ".json", ".ndjson")) else "text"
    if not compression and b"\x00" in head:
        raise InputError(f"{path}: binary data (NUL bytes) in a file read as text; supported "
                         f"inputs are {SUPPORTED}")
    return container, compression


class Position:
    """How far a reader is through its file: `fraction` in [0, 1] of the bytes on disk."""

    fraction = 0.0


def read_documents(path: str, text_key: str = "text", utf8_errors: str = "strict",
                   position: Position | None = None) -> Iterator[str]:
    """The documents of one file, in file order (empty ones included), streamed; `position`,
    if given, follows the reading (for a progress line)."""
    if utf8_errors not in UTF8_ERRORS:
        raise InputError(f"--utf8_errors must be one of {UTF8_ERRORS}, got {utf8_errors!r}")
    position = position or Position()
    container, compression = detect_format(path)
    if container == "parquet":
        yield from _parquet(path, text_key, utf8_errors, position)
    elif container == "array_record":
        yield from _array_record(path, utf8_errors, position)
    else:
        raw = paths.resolve(path).open("rb")
        size = max(1, _size(raw))
        with raw, _open_stream(raw, path, compression) as f:
            if container == "jsonl":
                for text in _jsonl(f, path, text_key, utf8_errors):
                    position.fraction = min(1.0, raw.tell() / size)
                    yield text
            else:
                data = _read_all(f, path)
                if compression and b"\x00" in data[:_SNIFF_BYTES]:  # e.g. a .tar.gz
                    raise InputError(f"{path}: binary data (NUL bytes) once decompressed; "
                                     f"supported inputs are {SUPPORTED}")
                yield _decode(data, path, utf8_errors, "byte", 0)
    position.fraction = 1.0


def _size(raw) -> int:
    """Bytes of an open file (local or remote); 1 when it cannot say."""
    try:
        return os.fstat(raw.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        try:
            here = raw.tell()
            size = raw.seek(0, io.SEEK_END)
            raw.seek(here)
            return size
        except (AttributeError, OSError, io.UnsupportedOperation):
            return 1


def _decode(data: bytes, path: str, utf8_errors: str, unit: str, index: int) -> str:
    """`data` (the file's `unit` `index`; for unit "byte", the bytes from that offset) as
    UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if utf8_errors == "replace":
            return data.decode("utf-8", errors="mla_moe.count_replace")
        if unit == "byte":
            unit, index, where = "byte", index + e.start, f"byte offset {index + e.start}"
        else:
            where = f"{unit} {index}, byte offset {e.start}"
        raise DataReadError(f"{path}: invalid UTF-8 at {where} ({data[e.start:e.end]!r}); fix "
                            "the file or pass --utf8_errors=replace", path, unit, index
                            ) from None


def _open_stream(raw, path: str, compression: str) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        zstd = extras.require("zstandard", f"reading {path}")
        return io.BufferedReader(_ZstdStream(raw, zstd, path), 1 << 20)
    return raw


def _read_all(f, path: str) -> bytes:
    try:
        return f.read()
    except DataReadError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataReadError(f"{path}: truncated or damaged compressed file ({e})", path
                            ) from None


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a (multi-frame) zstd file; a file that ends inside a frame
    raises InputError (zstandard's stream_reader would end quietly)."""

    def __init__(self, raw, zstd, path: str):
        self._raw, self._zstd, self._path = raw, zstd, path
        self._obj = zstd.ZstdDecompressor().decompressobj()
        self._pending, self._pos, self._in_frame = b"", 0, False
        self._read = 0  # compressed bytes read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._pending):
            self._pending, self._pos = b"", 0
            chunk = self._raw.read(1 << 20)
            self._read += len(chunk)
            if not chunk:
                if self._in_frame:
                    raise DataReadError(f"{self._path}: truncated zstd file (ends inside a "
                                        f"frame, at byte {self._read})", self._path, "byte",
                                        self._read)
                return 0
            while chunk:
                try:
                    self._pending += self._obj.decompress(chunk)
                except self._zstd.ZstdError as e:
                    raise DataReadError(f"{self._path}: damaged zstd data in the 1 MiB before "
                                        f"byte {self._read} ({e})", self._path, "byte",
                                        max(0, self._read - len(chunk))) from None
                self._in_frame = not self._obj.eof
                chunk = self._obj.unused_data if self._obj.eof else b""
                if self._obj.eof:
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
        n = min(len(buffer), len(self._pending) - self._pos)
        buffer[:n] = self._pending[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _jsonl(f, path: str, text_key: str, utf8_errors: str) -> Iterator[str]:
    lineno = 0
    lines = iter(f)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except (EOFError, zlib.error, gzip.BadGzipFile, DataReadError) as e:
            raise DataReadError(f"{path}: truncated or damaged compressed file after line "
                                f"{lineno} ({e})", path, "line", lineno + 1) from None
        lineno += 1
        if not line.strip():
            continue
        text = _decode(line, path, utf8_errors, "line", lineno)
        try:
            value = json.loads(text)[text_key]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            value = None
        if not isinstance(value, str):
            raise DataReadError(f"{path}:{lineno}: expected a JSON object with a {text_key!r} "
                                "string (set --text_key to the field holding the text)", path,
                                "line", lineno)
        yield value


def _parquet(path: str, text_key: str, utf8_errors: str, position: Position) -> Iterator[str]:
    pq = extras.require("pyarrow.parquet", f"reading {path}")
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(paths.resolve(path).open("rb"))
    except pa.ArrowException as e:
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise InputError(f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); "
                         "set --text_key to the column holding the text")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise InputError(f"{path}: column {text_key!r} holds {kind}, not text")
    row = 0
    batches = pf.iter_batches(batch_size=1024, columns=[text_key])  # streams the row groups
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:  # a damaged page: often a plain OSError
            raise DataReadError(f"{path}: unreadable at row {row} (rows from {row} on: "
                                f"{_first_line(e)})", path, "row", row) from None
        try:
            values = batch.column(0).to_pylist()
        except (pa.ArrowException, ValueError) as e:  # e.g. invalid UTF-8 in a string column
            raise DataReadError(f"{path}: unreadable at row {row} (rows {row}-"
                                f"{row + batch.num_rows - 1}: {_first_line(e)})", path, "row",
                                row) from None
        for value in values:
            if isinstance(value, bytes):
                value = _decode(value, path, utf8_errors, "row", row)
            row += 1
            yield value or ""
        position.fraction = row / max(1, pf.metadata.num_rows)


def _array_record(path: str, utf8_errors: str, position: Position) -> Iterator[str]:
    module = extras.require("array_record.python.array_record_module", f"reading {path}")
    try:
        reader = module.ArrayRecordReader(path)
    except (RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable ArrayRecord file ({_first_line(e)})") from None
    try:
        n = reader.num_records()
        for begin in range(0, n, 1024):
            try:
                records = reader.read(begin, min(n, begin + 1024))
            except (RuntimeError, ValueError, OSError) as e:
                raise DataReadError(f"{path}: unreadable at record {begin} (records {begin}-"
                                    f"{min(n, begin + 1024) - 1}: {_first_line(e)})", path,
                                    "record", begin) from None
            for i, record in enumerate(records, begin):
                yield _decode(record, path, utf8_errors, "record", i)
            position.fraction = min(n, begin + 1024) / n
    finally:
        reader.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
