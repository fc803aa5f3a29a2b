"""CDI spec files as the CDI library writes them, for runtimes to read."""

from __future__ import annotations

import json
from pathlib import Path


def write_spec(path: Path, spec: dict[str, object]) -> Path:
    """`spec` as JSON at `path`, written to a temporary file and renamed, so that a runtime never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(spec))
    tmp.replace(path)
    return path
