"""Real containerd (CRI + CDI + NRI) as hack/testenv/containerd.sh installs and starts it: one daemon per
`Containerd`, with its own state folder, sockets, CDI folder and cgroup parent, so that several run side by side.

    with Containerd("2.1.5") as daemon:
        pod = daemon.cri.run_pod("p")

VERSIONS are the versions `containerd.sh versions` names (Debian's 2.1.x and 1.7.x, and 2.4.x built from source).
Starting one takes about a second; it needs root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.component import Component, Unavailable
from tests.harness.paths import TESTENV, TESTENV_CACHE
from tests.harness.poll import WaitTimeout, wait_until
from tests.harness.runtimes.cdi import write_spec
from tests.harness.runtimes.cri import CriClient
from tests.harness.typed import present

SCRIPT = TESTENV / "containerd.sh"
CACHE = TESTENV_CACHE
VERSIONS = subprocess.run(["bash", str(SCRIPT), "versions"], check=True, capture_output=True, text=True).stdout.split()


def speaks_nri_0_12(version: str) -> bool:
    """Whether containerd `version` runs NRI 0.12 or later: 2.3.0 is the first release that requires it."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (2, 3)


def offers_memory_policy(version: str) -> bool:
    """Whether containerd `version`, with the runc containerd.sh gives it, applies an NRI memory policy adjustment:
    it needs NRI 0.12, and the containerd built from source runs runc 1.4 or later."""
    return speaks_nri_0_12(version)


def newest_2x() -> str:
    """The containerd 2.x the test environment has first (Debian's), which the real node runs."""
    return next(v for v in VERSIONS if v.startswith("2."))


@dataclass
class Containerd(Component):
    """One containerd daemon of `version`, its state in a new folder below /tmp (`dir`)."""

    version: str
    dir: Path = Path()
    """Its state, sockets and log; a new folder below /tmp unless given."""
    cgroup_parent: str = ""
    """Every pod's cgroup lives below it (/kubepods-<hash>); it is this daemon's alone. Known once started."""
    _cri: CriClient | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.dir == Path():
            self.dir = Path(tempfile.mkdtemp(prefix=f"dra-cpu-containerd-{self.version}-"))

    @property
    def cri(self) -> CriClient:
        """A CRI client of this daemon that remembers the pods it made (`clean()` removes them)."""
        return present(self._cri, f"the CRI client of containerd {self.version} (not started)")

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
    def cni_dir(self) -> Path:
        """Where this daemon's CRI plugin reads CNI network configurations."""
        return self.dir / "cni"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def bin_dir(self) -> Path:
        """containerd, ctr and the shims of this version."""
        return CACHE / f"containerd-{self.version}" / "usr" / "bin"

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("containerd needs root")
        if not (self.bin_dir / "containerd").exists():
            raise Unavailable(f"containerd {self.version} is not installed: run hack/testenv/containerd.sh install")
        _script("start", self.version, str(self.dir))
        self.cgroup_parent = (self.dir / "cgroup-parent").read_text().strip()
        self._cri = CriClient(self.cri_socket, self.cgroup_parent)
        self._cri.version()

    def stop(self) -> None:
        """Removes the pods this client made, stops the daemon and its shims, and removes its state and cgroups."""
        try:
            if self._cri is not None:
                try:
                    self._cri.cleanup()
                finally:
                    self._cri.close()
                    self._cri = None
        finally:
            if self.dir.exists():
                _script("stop", self.version, str(self.dir))

    def restart(self, nri: bool = True) -> None:
        """Stops the daemon (SIGTERM: containers and their shims go on running) and starts it again on the same
        state; `nri=False` starts it with NRI disabled (no NRI socket: dra-cpu cannot enforce)."""
        pid = int((self.dir / "containerd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not Path(f"/proc/{pid}").exists(), f"containerd {self.version} to exit", 20)
        except WaitTimeout:
            os.kill(pid, signal.SIGKILL)
        _script("start", self.version, str(self.dir), nri=nri)

    def write_cdi_spec(self, name: str, spec: dict[str, object]) -> Path:
        """Write a CDI spec as <cdi dir>/<name>.json the way the CDI library does: a temporary file, then a rename."""
        return write_spec(self.cdi_dir / f"{name}.json", spec)

    def ctr(self, *args: str, stdin: bytes | None = None, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        """`ctr -n k8s.io ARGS` against this daemon (the namespace the CRI plugin keeps images and containers in)."""
        return subprocess.run(
            [str(self.bin_dir / "ctr"), "-a", str(self.cri_socket), "-n", "k8s.io", *args],
            input=stdin, capture_output=True, check=True, timeout=timeout,
        )  # fmt: skip

    def clean(self) -> None:
        """Remove what tests left: pods (with their containers) and CDI specs."""
        self.cri.cleanup()
        for spec in self.cdi_dir.iterdir():
            spec.unlink()


def _script(*args: str, nri: bool = True) -> None:
    env = {**os.environ, "NRI": "on" if nri else "off"}
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"containerd.sh {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
