"""Real podman + runc (a CDI consumer without NRI), installed by hack/testenv/podman.sh.

    with Podman() as podman:
        podman.write_cdi_spec(spec)
        podman.run(["cat", "/proc/self/status"], devices=["dra.cpu/cpu=x"])

`write_cdi_spec` puts a spec where podman 4.3 looks (/var/run/cdi: it has no setting for another directory) under a
unique file name, removed by `stop()`; `run` is `podman run --rm`. Rootful: it needs root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.component import Component, Unavailable
from tests.harness.paths import TESTENV_CACHE
from tests.harness.runtimes.cdi import write_spec

CONTAINERS_CONF = TESTENV_CACHE / "podman" / "containers.conf"
IMAGE = "localhost/bb:latest"
CDI_DIR = Path("/var/run/cdi")


@dataclass
class Podman(Component):
    env: dict[str, str] = field(default_factory=lambda: {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    """The environment podman runs with: the test environment's storage and registries, not the machine's."""
    specs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("the podman tests run rootful podman and need root")
        if shutil.which("podman") is None or not CONTAINERS_CONF.exists():
            raise Unavailable("podman is not installed: run hack/testenv/podman.sh install")

    def stop(self) -> None:
        for spec in self.specs:
            spec.unlink(missing_ok=True)
        self.specs.clear()

    def write_cdi_spec(self, spec: dict[str, object]) -> Path:
        """Write a CDI spec under a name no other test uses; specs in one directory defining the same device
        cancel each other out, so the devices in it should have unique names too."""
        path = write_spec(CDI_DIR / f"dra-cpu-test-{uuid.uuid4().hex}.json", spec)
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
