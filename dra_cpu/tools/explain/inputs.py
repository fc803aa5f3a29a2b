"""Kubernetes objects from the files and folders people give `explain`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dra_cpu.store.fileio import read_yaml
from dra_cpu.tools.explain.model import ExplainInputError
from dra_cpu.tools.explain.parse import describe


def load_objects(path: Path) -> list[dict[str, Any]]:
    """Every object in a YAML stream or JSON file (v1 Lists unpacked), or in the *.yaml/*.yml/*.json of a folder."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        return [obj for p in files for obj in load_objects(p)]
    docs = read_yaml(path, "file", ExplainInputError)
    objects: list[dict[str, Any]] = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ExplainInputError(f"{path}: holds {type(doc).__name__} {doc!r}, not a Kubernetes object")
        if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            objects.extend(item for item in doc["items"] if isinstance(item, dict))
        else:
            objects.append(doc)
    return objects


def of_kind(objects: Iterable[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") in kinds]


def pick_claim(objects: list[dict[str, Any]], source: str, name: str | None) -> dict[str, Any]:
    claims = of_kind(objects, "ResourceClaim", "ResourceClaimTemplate")
    if name is not None:
        claims = [c for c in claims if (c.get("metadata") or {}).get("name") == name]
    if len(claims) != 1:
        found = ", ".join(describe(c) for c in claims) or "none"
        hint = " (pick one with --claim-name)" if len(claims) > 1 else ""
        wanted = f" named {name!r}" if name else ""
        raise ExplainInputError(
            f"--claim {source}: expected one ResourceClaim or ResourceClaimTemplate{wanted}, found {found}{hint}"
        )
    return claims[0]
