"""The error of a data file that cannot be read, carrying where: the file and the line, row,
record, document, byte or token at which reading failed.

    raise DataReadError(f"{path}:{line}: expected a JSON object ...", path, "line", line)

It is an `InputError` (the launchers print its message as one `error:` line and exit 1, and
the trainer saves no checkpoint after it), and it pickles with its fields, so the error raised
in a Grain worker process reaches the training process whole.
"""

from __future__ import annotations

from mla_moe.errors import InputError

UNITS = ("line", "row", "record", "document", "byte", "token")


class DataReadError(InputError):
    """A data file failed to read. `path`: the file (a store's array for a token store);
    `unit` in `UNITS` and `index` (0-based for rows, records, documents, bytes and tokens;
    1-based for lines, as an editor counts them) say where, or are None when the file as a
    whole is unreadable."""

    def __init__(self, message: str, path: str = "", unit: str | None = None,
                 index: int | None = None):
        super().__init__(message)
        if unit is not None and unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        self.path, self.unit = str(path), unit
        self.index = None if index is None else int(index)

    @property
    def location(self) -> str:
        """'row 1024', 'line 7', ... ('' when the whole file is unreadable)."""
        return "" if self.unit is None else f"{self.unit} {self.index}"

    def reworded(self, message: str) -> DataReadError:
        """The same error (file and place) with another message."""
        return DataReadError(message, self.path, self.unit, self.index)

    def __reduce__(self):  # pickled by its fields (Grain sends a worker's errors this way)
        return type(self), (str(self), self.path, self.unit, self.index)
