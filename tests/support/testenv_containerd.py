"""pytest plugin: real containerd (CRI + CDI + NRI), started by hack/testenv/containerd.sh.

Fixtures, each parametrized over the containerd versions that `containerd.sh versions` names (Debian's 2.1.x and
1.7.x, and 2.4.x built from source):
  containerd        a daemon shared by the tests of a session; pods and CDI specs a test made are removed after it
  fresh_containerd  a daemon of the test's own, for tests that restart it or need it without state (NRI plugins
                    registering first, ...); stopped after the test
Both yield a `Containerd`; tests that use them are marked `containerd`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.paths import TESTENV
from tests.harness.poll import wait_until
from tests.support.cri import CriClient

SCRIPT = TESTENV / "containerd.sh"
CACHE = Path("/var/cache/dra-cpu-testenv")
VERSIONS = subprocess.run(["bash", str(SCRIPT), "versions"], check=True, capture_output=True, text=True).stdout.split()


def speaks_nri_0_12(version: str) -> bool:
    """Whether containerd `version` runs NRI 0.12 or later: 2.3.0 is the first release that requires it."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (2, 3)


def offers_memory_policy(version: str) -> bool:
    """Whether containerd `version`, with the runc containerd.sh gives it, applies an NRI memory policy adjustment:
    it needs NRI 0.12, and the containerd built from source runs runc 1.4 or later."""
    return speaks_nri_0_12(version)


@dataclass
class Containerd:
    version: str
    dir: Path
    cgroup_parent: str
    """Every pod's cgroup lives below it (/kubepods-<hash>); it is this daemon's alone."""
    cri: CriClient
    wrap: tuple[str, ...] = ()
    """The command containerd.sh runs under, if any: nsenter into the cgroup v2 mount namespace of cgroupv2.sh."""

    @property
    def cri_socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def nri_socket(self) -> Path:
        """In a folder of its own (DIR/nri), which a DaemonSet can mount without the rest of DIR."""
        return self.dir / "nri" / "nri.sock"

    @property
    def cdi_dir(self) -> Path:
        """The only CDI spec directory this daemon reads."""
        return self.dir / "cdi"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    def write_cdi_spec(self, name: str, spec: dict[str, object]) -> Path:
        """Write a CDI spec as <cdi dir>/<name>.json the way the CDI library does: a temporary file, then a rename."""
        path = self.cdi_dir / f"{name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(spec))
        tmp.replace(path)
        return path

    def restart(self) -> None:
        """Stop the daemon (SIGTERM: containers and their shims go on running) and start it again on the same state."""
        pid = int((self.dir / "containerd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), f"containerd {self.version} to exit")
        _script("start", self.version, str(self.dir), wrap=self.wrap)

    def clean(self) -> None:
        """Remove what tests left: pods (with their containers) and CDI specs."""
        self.cri.cleanup()
        for spec in self.cdi_dir.iterdir():
            spec.unlink()


def _script(*args: str, wrap: Sequence[str] = ()) -> None:
    result = subprocess.run([*wrap, "bash", str(SCRIPT), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"containerd.sh {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")


def _start(version: str, wrap: tuple[str, ...] = ()) -> Containerd:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    if not (CACHE / f"containerd-{version}" / "usr" / "bin" / "containerd").exists():
        pytest.skip(f"containerd {version} is not installed: run hack/testenv/containerd.sh install")
    directory = Path(tempfile.mkdtemp(prefix=f"dra-cpu-containerd-{version}-"))
    try:
        _script("start", version, str(directory), wrap=wrap)
    except RuntimeError:
        _script("stop", version, str(directory), wrap=wrap)
        raise
    cgroup_parent = (directory / "cgroup-parent").read_text().strip()
    cri = CriClient(directory / "containerd.sock", cgroup_parent)
    daemon = Containerd(version, directory, cgroup_parent, cri, wrap)
    daemon.cri.version()
    return daemon


def _stop(daemon: Containerd) -> None:
    daemon.cri.close()
    _script("stop", daemon.version, str(daemon.dir), wrap=daemon.wrap)


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def _containerd_session(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    daemon = _start(str(request.param))
    yield daemon
    _stop(daemon)


@pytest.fixture
def containerd(_containerd_session: Containerd) -> Iterator[Containerd]:
    yield _containerd_session
    _containerd_session.clean()


@pytest.fixture(params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def fresh_containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    daemon = _start(str(request.param))
    yield daemon
    try:
        daemon.cri.cleanup()
    finally:
        _stop(daemon)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"containerd", "fresh_containerd"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.containerd)
