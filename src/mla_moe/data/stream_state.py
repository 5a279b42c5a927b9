"""What a checkpointed data position belongs to, checked before a resume uses it.

A train iterator's state (saved in each checkpoint, one file per process) is a position in
one stream: the stream of these sources, weights, seed, window length, global batch and
process count (and, for a raw source, its files, tokenizer, text key and worker count). The
same position in another stream reads other examples, or fails obscurely (a checkpoint of P
processes has no state for process P + 1). So `train_iterator` returns a `StreamIterator`,
whose state is

    {"stream": describe(source, cfg), "position": the pipeline's own state}

and a resume (`check_saved`, before the train state is restored, and `set_state` itself)
refuses a position saved for another stream with one error naming the fields that differ:

    process_count: 1 -> 2; sources[1].weight: 0.5 -> 0.3

A state without "stream" (saved before this check existed) is restored as it is.
"""

from __future__ import annotations

import hashlib
import json
import re

import grain

from mla_moe.errors import InputError

PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # Grain's name for a process's state


class StreamMismatchError(InputError):
    """A checkpoint's data position belongs to another data stream than this run's."""


def describe(source, cfg) -> dict:
    """The stream a position of `train_iterator(source, cfg)` belongs to: JSON values only.
    `source`: a TokenSplit, RawSource or TokenMixture; `cfg`: its PipelineConfig."""
    from mla_moe.data.raw_source import RawSource

    splits = getattr(source, "splits", [source])
    weights = getattr(source, "weights", [1.0])
    sources = []
    for split, weight in zip(splits, weights):
        entry = {"path": str(split.path), "weight": round(float(weight), 12)}
        if isinstance(split, RawSource):
            names = "\n".join(split.files).encode()
            entry.update(files=f"{len(split.files)} files, sha1 "
                               f"{hashlib.sha1(names).hexdigest()[:12]}",
                         tokenizer=str(split.tokenizer), text_key=split.text_key)
        else:
            entry["tokens"] = int(split.num_tokens)
        sources.append(entry)
    stream = {"process_count": cfg.process_count, "seed": cfg.seed, "seq_len": cfg.seq_len,
              "global_batch": cfg.global_batch, "sources": sources}
    if any(isinstance(split, RawSource) for split in splits):
        stream["workers"] = max(1, cfg.workers)  # 0 and 1 give the same stream
    return stream


def differences(saved: dict, current: dict) -> list[str]:
    """'field: saved -> current' for each field of two `describe` results that differs."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b), key=_field_order) if a.get(k) != b.get(k)]


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {f"{prefix}.count": len(value)}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _field_order(key: str) -> tuple:
    return (key != "process_count", key)  # the process count first: the likeliest change


def _refuse(where: str, diffs: list[str]) -> StreamMismatchError:
    return StreamMismatchError(
        f"{where} holds the data position of another data stream ({'; '.join(diffs)}); "
        "resuming would read other examples: resume with the data settings and process count "
        "it was saved with, or use a new --workdir")


class StreamIterator(grain.DatasetIterator):
    """`parent` (the pipeline's iterator) with its stream (`describe`) saved in its state and
    checked when a state is set. `process_index`: this process's (names its state file)."""

    def __init__(self, parent: grain.DatasetIterator, stream: dict, process_index: int = 0):
        super().__init__(parent)
        self.stream, self.process_index = stream, process_index

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {"stream": self.stream, "position": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        if "stream" not in state or "position" not in state:  # saved before streams were
            self._parent.set_state(state)
            return
        diffs = differences(state["stream"], self.stream)
        if diffs:
            raise _refuse("the checkpoint", diffs)
        self._parent.set_state(state["position"])


def check_saved(directory, iterator, step: int | None = None) -> None:
    """Refuses (StreamMismatchError) the data positions saved in `directory` (a checkpoint's
    Grain item: one `process_i-of-n.json` per process) unless they belong to `iterator`'s
    stream. `directory`: an epath.Path; `iterator`: a StreamIterator (anything else, or a
    checkpoint without data, passes)."""
    if not isinstance(iterator, StreamIterator) or not directory.is_dir():
        return
    where = "the checkpoint" if step is None else f"checkpoint step {step}"
    files = {}
    for child in directory.iterdir():
        m = PROCESS_FILE.fullmatch(child.name)
        if m:
            files[int(m.group(1))] = (int(m.group(2)), child)
    counts = {n for n, _ in files.values()}
    current = iterator.stream["process_count"]
    if counts and counts != {current}:
        raise _refuse(where, [f"process_count: {max(counts)} -> {current}"])
    if iterator.process_index not in files:
        return
    state = json.loads(files[iterator.process_index][1].read_text())
    if isinstance(state, dict) and "stream" in state:
        diffs = differences(state["stream"], iterator.stream)
        if diffs:
            raise _refuse(where, diffs)
