"""Run paths that may be local or cloud URLs (`gs://bucket/run`): the workdir and data.path go
through `etils.epath` (and tensorstore's kvstore URLs), never `os.path` / `open()`, so that
Orbax, tensorstore and Grain read and write them wherever they are.

    workdir = resolve("gs://bucket/run")    # epath.Path; a local path becomes absolute
    (workdir / "config.json").write_text(...)
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """A `scheme://...` location (gs://, s3://, file://) rather than a local path."""
    return "://" in str(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path; a local one made absolute."""
    return epath.Path(str(path) if is_url(path) else os.path.abspath(path))


def kvstore(path: str | os.PathLike) -> dict | str:
    """A tensorstore kvstore for the directory `path`: a URL as tensorstore spells it, a local
    path through the file driver."""
    if is_url(path):
        return str(path).rstrip("/") + "/"
    return {"driver": "file", "path": str(path)}
