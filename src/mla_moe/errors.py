"""Errors that mean bad input from the user, as opposed to a bug in this package.

Each message is one line that names the field, flag, file or directory at fault and says what
to do. The launchers print these as one `error: ...` line and exit with status 1; any other
exception is a bug and keeps its traceback.

`InputError` derives from `ValueError` (and the file variants from the matching `OSError`s), so
callers that caught those before keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad value, flag, file or directory given by the user."""


class ConfigError(InputError):
    """A bad config value; the message names the field (`train.steps`, `model.hidden_size`)."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class ExistingOutputError(InputError, FileExistsError):
    """An output the user named already exists (and may not be replaced)."""


__all__ = ["ConfigError", "ExistingOutputError", "InputError", "MissingInputError"]
