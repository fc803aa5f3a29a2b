"""pytest plugin: real podman + runc (a CDI consumer without NRI), installed by hack/testenv/podman.sh.

Fixture `podman` yields a `Podman`: `write_cdi_spec` puts a spec where podman 4.3 looks (/var/run/cdi: it has no
setting for another directory) under a unique file name, removed after the test; `run` is `podman run --rm`.
Tests that use it are marked `podman`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CONTAINERS_CONF = Path("/var/cache/dra-cpu-testenv/podman/containers.conf")
IMAGE = "localhost/bb:latest"
CDI_DIR = Path("/var/run/cdi")


@dataclass
class Podman:
    env: dict[str, str]
    specs: list[Path] = field(default_factory=list)

    def write_cdi_spec(self, spec: dict[str, object]) -> Path:
        """Write a CDI spec under a name no other test uses; specs in one directory defining the same device
        cancel each other out, so the devices in it should have unique names too."""
        CDI_DIR.mkdir(parents=True, exist_ok=True)
        path = CDI_DIR / f"dra-cpu-test-{uuid.uuid4().hex}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(spec))
        tmp.replace(path)
        self.specs.append(path)
        return path

    def run(
        self, cmd: Sequence[str], *, options: Sequence[str] = (), devices: Sequence[str] = (), check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`podman run --rm [--device D]... OPTIONS... localhost/bb:latest CMD...`; stdout and stderr captured."""
        args = ["podman", "run", "--rm", *(f"--device={d}" for d in devices), *options, IMAGE, *cmd]
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result


@pytest.fixture
def podman() -> Iterator[Podman]:
    if os.geteuid() != 0:
        pytest.skip("the podman tests run rootful podman and need root")
    if shutil.which("podman") is None or not CONTAINERS_CONF.exists():
        pytest.skip("podman is not installed: run hack/testenv/podman.sh install")
    session = Podman({**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    yield session
    for spec in session.specs:
        spec.unlink(missing_ok=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "podman" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.podman)
