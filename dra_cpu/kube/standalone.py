"""The cluster as a folder, for development and the demo: slices are written to DIR/resourceslices/<name>.yaml and
claims are read from DIR/resourceclaims/<namespace>/<name>.yaml and pods from DIR/pods/<namespace>/<name>.yaml, in the
same shape the API server returns."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.kube.api import ClusterError, Conflict, NotFound
from dra_cpu.store.fileio import YAML_LOADER, write_atomic

POLL_SECONDS = 0.5


@dataclass(frozen=True)
class StandaloneAPI:
    root: Path

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            obj = yaml.load(path.read_text(), Loader=YAML_LOADER)
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
        except (OSError, yaml.YAMLError, ValueError) as err:  # ValueError: not UTF-8, or a 5000-digit integer
            raise ClusterError(f"cannot read {path}: {' '.join(str(err).split())[:300]}") from None
        if not isinstance(obj, dict):
            raise ClusterError(f"{path} does not hold a Kubernetes object")
        return obj

    def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        return self._read(self.root / "resourceclaims" / namespace / f"{name}.yaml")

    def get_pod(self, namespace: str, name: str, uid: str = "") -> dict[str, Any]:
        return self._read(self.root / "pods" / namespace / f"{name}.yaml")

    def get_node(self, name: str) -> dict[str, Any] | None:
        return None

    def on_pod_end(self, callback: Callable[[str], None]) -> None:
        """Nothing watches the folder's pods: hand-over waits for a refused container instead."""

    @property
    def _slices(self) -> Path:
        return self.root / "resourceslices"

    def list_slices(self, driver: str, node: str) -> list[dict[str, Any]]:
        if not self._slices.is_dir():
            return []
        objs = [self._read(p) for p in sorted(self._slices.glob("*.yaml"))]
        return [o for o in objs if o.get("spec", {}).get("driver") == driver and o["spec"].get("nodeName") == node]

    def _write(self, obj: dict[str, Any]) -> dict[str, Any]:
        stored = {**obj, "metadata": {**obj["metadata"], "resourceVersion": uuid.uuid4().hex[:12]}}
        self._slices.mkdir(parents=True, exist_ok=True)
        write_atomic(self._slices / f"{obj['metadata']['name']}.yaml", yaml.safe_dump(stored, sort_keys=False).encode())
        return stored

    def create_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        if (self._slices / f"{obj['metadata']['name']}.yaml").exists():
            raise Conflict(f"resourceslice {obj['metadata']['name']} already exists")
        return self._write(obj)

    def update_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        current = self._read(self._slices / f"{obj['metadata']['name']}.yaml")
        wanted = obj["metadata"].get("resourceVersion")
        if wanted and wanted != current["metadata"].get("resourceVersion"):
            raise Conflict(f"resourceslice {obj['metadata']['name']} changed since it was read")
        return self._write(obj)

    def delete_slice(self, name: str) -> None:
        (self._slices / f"{name}.yaml").unlink(missing_ok=True)

    def watch_slices(self, driver: str, node: str, stop: threading.Event) -> Iterator[None]:
        # A folder has no watch: compare resource versions on a short poll.
        seen = self._versions(driver, node)
        while not stop.wait(POLL_SECONDS):
            current = self._versions(driver, node)
            if current != seen:
                seen = current
                yield None

    def _versions(self, driver: str, node: str) -> dict[str, str]:
        return {
            s["metadata"]["name"]: str(s["metadata"].get("resourceVersion")) for s in self.list_slices(driver, node)
        }
