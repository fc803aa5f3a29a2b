"""docs/design.md's module table against the package: every module and folder of dra_cpu/ is listed, and nothing
listed is missing.

A row names modules and folders in backticks in its first column (`core/ledger.py`, `node/`); a folder's row names
its own modules and subfolders in backticks in its last column (`sysfs.py`, `explain/`), and a subfolder's modules
in the parentheses right after it (`explain/` (`model.py`)). A folder whose modules have rows of their own is
listed through them. Generated code (`gen/`) and `__init__.py` files are the folders' own."""

from __future__ import annotations

import re
from pathlib import Path

from tests.harness.paths import REPO

PACKAGE = REPO / "dra_cpu"
DOC = REPO / "docs/design.md"
_NAME = re.compile(r"`([A-Za-z0-9_./-]+)`")


def _package() -> set[str]:
    """Every module and folder, relative to dra_cpu/: `core/ledger.py`, `node/`."""
    out = set()
    for path in PACKAGE.rglob("*"):
        relative = path.relative_to(PACKAGE)
        if "gen" in relative.parts or "__pycache__" in relative.parts or path.name == "__init__.py":
            continue
        if path.is_dir():
            out.add(f"{relative}/")
        elif path.suffix == ".py":
            out.add(str(relative))
    return out


def _table() -> list[tuple[list[str], str]]:
    """(the names of the first column, the rest of the row) of every row of the module table."""
    text = DOC.read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first, rest = line[1:].split("|", 1)
            rows.append((_NAME.findall(first), rest))
    return rows


def _listed() -> set[str]:
    listed = set()
    for names, rest in _table():
        listed.update(names)
        for folder in (n for n in names if n.endswith("/")):
            listed.update(_in_folder(folder, rest))
    # A folder whose modules have rows of their own (core/) is listed through them.
    listed |= {str(Path(name).parent) + "/" for name in listed if "/" in name.rstrip("/")}
    return {name for name in listed if "gen" not in name.split("/")}


def _in_folder(folder: str, text: str) -> set[str]:
    """The modules and subfolders a folder's row names: `x.py` is the folder's, unless it stands in the
    parentheses right after a subfolder's name (`explain/` (`model.py`)), which make it the subfolder's."""
    found, scopes, depth, last = set(), [folder], 0, ""
    for match in re.finditer(r"`([^`]+)`|(\()|(\))", text):
        name, opening, closing = match.groups()
        if opening:
            depth += 1
            following = text[match.start() - 2 : match.start()] == "` "
            scopes.append(scopes[-1] + last if following and last.endswith("/") else scopes[-1])
        elif closing:
            depth -= 1
            scopes.pop()
        elif re.fullmatch(r"[A-Za-z0-9_]+(/|\.py)", name):
            found.add(scopes[-1] + name)
        last = name or ""
    return found


def test_the_table_lists_every_module_and_folder_of_the_package() -> None:
    missing = sorted(_package() - _listed())
    assert not missing, f"docs/design.md's module table does not list: {', '.join(missing)}"


def test_the_table_lists_nothing_the_package_does_not_have() -> None:
    extra = sorted(_listed() - _package())
    assert not extra, f"docs/design.md's module table lists what dra_cpu/ does not have: {', '.join(extra)}"


def test_the_table_is_read_at_all() -> None:
    """A table the parser misses would pass the two tests above vacuously only if the package were empty."""
    assert len(_table()) > 20
    assert {"core/ledger.py", "node/", "store/checkpoint_v1.py", "tools/explain/model.py"} <= _listed()
