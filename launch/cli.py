"""What the launchers share: flag parsing whose every mistake is one line, and a quiet console.

    from launch import cli
    if __name__ == "__main__":
        cli.run(main)

A bad flag, config file or config override, and any `mla_moe.errors.InputError` raised by
`main`, ends the program with one `error: ...` line on stderr and exit status 1. Any other
exception is a bug and keeps its traceback.

Importing this module starts jax (`launch.startup`): a launcher imports it before anything
that imports jax.
"""

from __future__ import annotations

import difflib
import logging as py_logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging

from launch import startup

startup.start(sys.argv)  # before jax is imported: `mla_moe` imports it

from mla_moe.errors import InputError  # noqa: E402

FLAGS = flags.FLAGS


def fail(message: str) -> NoReturn:
    """Prints `error: message` as one line on stderr and exits with status 1."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(1)


def _config_flag_names() -> list[str]:
    """The ml_collections config-file flags defined by the launcher (`--config`)."""
    return [name for name in FLAGS if FLAGS[name].flag_type() == "config object"]


def _config_spec(argv: list[str], name: str) -> str:
    """The value given to `--name` (`path[:variant]`), from argv as typed."""
    spec = ""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--{name}="):
            spec = arg.partition("=")[2]
        elif arg == f"--{name}" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _load_problem(argv: list[str], name: str):
    """(the config of `--name` or None, one line saying why it did not load or None)."""
    spec = _config_spec(argv, name)
    path = spec.partition(":")[0]
    if not spec:
        return None, None
    if not os.path.isfile(path):
        return None, (f"--{name}={spec}: no such config file; pass a file that defines "
                      "get_config(), e.g. configs/tiny.py")
    try:
        config = FLAGS[name].parser.parse(spec)
        config.keys()  # a config that failed to load raises on any access
    except Exception as e:  # noqa: BLE001 - only to word the message; the flag parse failed
        reason = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = reason[-1] if reason else repr(e)
        return None, f"--{name}={spec}: cannot load the config file ({reason})"
    return config, None


def _override_problem(argv: list[str], name: str, config) -> str | None:
    """For the first `--config.a.b=v` whose field the config lacks: one line naming it, with
    the closest field name or the fields there are."""
    prefix = f"--{name}."
    for arg in argv[1:]:
        if not arg.startswith(prefix):
            continue
        path = arg[len(prefix):].partition("=")[0]
        node, walked = config, []
        for part in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(walked) or "the config"
                close = difflib.get_close_matches(part, keys, n=1)
                hint = (f"did you mean --{name}.{'.'.join(walked + close)}?" if close
                        else f"the fields of {where} are: {', '.join(sorted(keys))}")
                return f"--{name}.{path}: {where} has no field {part!r}; {hint}"
            node, walked = node[part], walked + [part]
    return None


def _config_problem(argv: list[str]) -> str | None:
    for name in _config_flag_names():
        config, problem = _load_problem(argv, name)
        if problem is None and config is not None:
            problem = _override_problem(argv, name, config)
        if problem:
            return problem
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags_parser: absl's parsing, each failure turned into one line."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:  # unknown flag, bad value, missing required flag
        message = str(e)
        if "Error whilst parsing config file" in message:  # a ValueError in get_config()
            lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
            head = message.split(":", 1)[0].removeprefix("flag ")
            fail(f"{head}: {lines[-1].split(': ', 1)[-1]}")
        fail(f"{message} (--helpshort lists the flags)")
    except SyntaxError as e:  # in the config file itself
        fail(f"config file {e.filename}, line {e.lineno}: {e.msg}")
    except (AttributeError, KeyError, OSError):
        # An override of a field the config lacks, or overrides of a config file that did not
        # load: say which, from the flags as typed. Anything else is ours: re-raised.
        problem = _config_problem(argv)
        if problem:
            fail(problem)
        raise
    for name in _config_flag_names():  # a config file that did not load (no override given)
        try:
            if FLAGS[name].value is not None:
                FLAGS[name].value.keys()
        except OSError as e:
            fail(_config_problem(argv) or f"--{name}: {str(e).splitlines()[0]}")
    return rest


class _OnlyOurWarnings(py_logging.Filter):
    """Drops Orbax's and Grain's routine warnings (read-only managers, deferred handlers):
    below ERROR they are chatter to a user, kept for --verbosity."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain"))
        return record.levelno >= py_logging.ERROR or not noisy


def quiet_console() -> None:
    """The console carries our lines, warnings and errors; library INFO chatter (Orbax's
    thread and metadata-store lines) appears only with an explicit --verbosity."""
    if FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_OnlyOurWarnings())


def run(main: Callable[[list[str]], None], argv: list[str] | None = None,
        positional: bool = False) -> None:
    """`app.run(main)` with one-line errors for bad flags and for `InputError`s. `argv`: the
    program's arguments if not `sys.argv`; `positional`: `main` takes arguments other than
    flags (else any is an error)."""

    def guarded(argv):
        if len(argv) > 1 and not positional:
            fail(f"unexpected arguments {argv[1:]}: flags are passed as --name=value")
        quiet_console()
        try:
            main(argv)
        except InputError as e:
            fail(str(e))

    app.run(guarded, argv=argv, flags_parser=parse_flags)
