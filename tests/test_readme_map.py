"""README's architecture map names every module and preset in the tree, and nothing else.

The map is the code block under "## Architecture map": one line per module, indented two
spaces per folder level under the folder's own line (`train/`), the name then its role. A
folder's line stands for its `__init__.py`. Modules are found by walking the tree, so a module
added, moved or removed without its line in the map fails here.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Every .py under these folders is a module (or preset) the map must name.
MAPPED = ("src/mla_moe", "pallas_kernels", "launch", "configs")
_ENTRY = re.compile(
    r"^(?P<indent> *)(?P<name>[\w.]+(?:/[\w.]+)*(?:\.py|/))(?:\s{2,}(?P<role>\S.*))?$"
)


def _map_block() -> list[str]:
    """The lines of the code block in README's "## Architecture map" section."""
    text = README.read_text()
    section = re.search(r"^## Architecture map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, 'README.md has no "## Architecture map" section'
    block = re.search(r"^```[^\n]*\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the architecture map has no code block"
    return block.group(1).splitlines()


def _entries() -> dict[str, str]:
    """{path the map names, relative to the repository root: its role}."""
    entries: dict[str, str] = {}
    folders: list[str] = []  # the folder of each indentation level above the current line
    for line in _map_block():
        if not line.strip():
            continue
        m = _ENTRY.match(line)
        assert m, f"architecture map: not `name  role`: {line!r}"
        indent = len(m["indent"])
        assert indent % 2 == 0 and indent // 2 <= len(folders), (
            f"architecture map: bad indentation (two spaces per folder level): {line!r}"
        )
        folders = folders[: indent // 2]
        path = "".join(folders) + m["name"]
        assert path not in entries, f"architecture map: {path} is named twice"
        assert m["role"], f"architecture map: {path} has no role"
        entries[path] = m["role"]
        if path.endswith("/"):
            folders.append(m["name"])
    return entries


def _named_modules(entries: dict[str, str]) -> set[str]:
    """The .py files the entries name: files, and each folder's __init__.py."""
    named = {p for p in entries if p.endswith(".py")}
    named |= {p + "__init__.py" for p in entries if p.endswith("/")}
    return named


def _modules() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for root in MAPPED
        for p in (ROOT / root).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_map_names_every_module():
    missing = sorted(_modules() - _named_modules(_entries()))
    assert not missing, f"README's architecture map lacks: {', '.join(missing)}"


def _exists(path: str) -> bool:
    return (ROOT / path).is_dir() if path.endswith("/") else (ROOT / path).is_file()


def test_map_names_only_what_exists():
    gone = [p for p in _entries() if not _exists(p)]
    assert not gone, f"README's architecture map names what does not exist: {', '.join(gone)}"


@pytest.mark.parametrize("root", MAPPED)
def test_mapped_folders_are_in_the_map(root):
    assert root + "/" in _entries()
