"""The package's layering, read from its imports: the core is pure, the shell depends on the core and never the
other way, and no two modules import each other (directly or through others)."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.paths import REPO

PACKAGE = REPO / "dra_cpu"
# What would make a core module do I/O, block or depend on the process around it.
IMPURE = {
    "os", "io", "sys", "subprocess", "socket", "select", "shutil", "tempfile", "pathlib", "glob", "mmap", "ctypes",
    "threading", "multiprocessing", "concurrent", "asyncio", "signal", "time", "logging", "argparse", "http",
    "urllib", "urllib3", "grpc", "kubernetes", "pyudev", "psutil", "prometheus_client", "yaml", "json",
}  # fmt: skip
# Who may import whom, by top-level part of dra_cpu (a module's own part always may).
ALLOWED = {
    "core": {"errors"},
    "node": {"core", "errors"},
    "store": {"core", "errors"},
    "kube": {"core", "store", "errors"},
    "nri": {"core", "errors", "logs", "node"},
    "reconciler": {"core", "store", "errors", "logs"},
    "driver": {"core", "kube", "reconciler", "errors", "logs"},
    "rediscovery": {"core", "node", "driver", "errors"},
    "handover": {"core", "driver", "kube", "errors"},
    "process": set(),
    "kubelet": {"core", "driver", "errors"},
    "cdihook": {"core", "node", "store", "errors"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if "gen" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import, TYPE_CHECKING ones left out (they do not run)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*prefix, base] if base else prefix)
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {
        name: {target for _, imported in _imports(name, path) if (target := _own(imported, mods)) and target != name}
        for name, path in mods.items()
    }


def _own(imported: str, mods: dict[str, Path]) -> str | None:
    while imported:
        if imported in mods:
            return imported
        imported = imported.rpartition(".")[0]
    return None


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_core_imports_nothing_but_the_standard_library_and_itself() -> None:
    stdlib = sys.stdlib_module_names
    found = []
    for name, path in _modules().items():
        if _part(name) != "core":
            continue
        for line, imported in _imports(name, path):
            top = imported.split(".")[0]
            own = top == "dra_cpu" and _part(imported) in ("core", "errors", "")
            if (
                top in IMPURE
                or (top != "dra_cpu" and top not in stdlib and top != "__future__")
                or (top == "dra_cpu" and not own)
            ):
                found.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(part: str) -> None:
    found = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        if _part(name) == part
        for target in targets
        if _part(target) not in ALLOWED[part] | {part, ""}
    ]
    assert not found, "\n".join(found)


def test_nothing_but_the_command_line_imports_the_offline_tools_or_the_command_line() -> None:
    found = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if (_part(target) == "cli" and _part(name) != "cli" and name != "dra_cpu.__main__")
        or (_part(target) == "tools" and _part(name) not in ("tools", "cli"))
    ]
    assert not found, "\n".join(found)


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
