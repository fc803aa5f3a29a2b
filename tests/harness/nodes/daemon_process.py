"""The daemon process: `dra-cpu run --standalone` as a child process of the test, on a sysfs fixture, with the test
playing the kubelet over its sockets (the stand-in node's kind, with the driver as users run it), for the daemon and
fault tests: start it, read its log as it comes, wait for its exit with a bound, and read back what it left on disk."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.core import cdi_spec
from dra_cpu.core.claims import ClaimRef, allocated_claim_object
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import Ledger
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile
from tests.harness.claims import DRIVER, NODE, FolderClaims, result
from tests.harness.paths import SYSFS
from tests.harness.poll import wait_until


def run_daemon(root: Path, port: int, *extra: str, sysfs: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "dra_cpu", "run",
            "--node-name", NODE,
            "--standalone", str(root / "cluster"),
            "--enforcement", "none",
            "--sysfs-root", str(sysfs or SYSFS / "dual-socket-smt2"),
            "--kubelet-root-dir", str(root / "kubelet"),
            "--cdi-root", str(root / "cdi"),
            "--state-dir", str(root / "state"),
            "--metrics-address", f"127.0.0.1:{port}",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def registration_socket(root: Path) -> Path:
    return root / f"kubelet/plugins_registry/{DRIVER}-reg.sock"


class Stderr:
    """A daemon's stderr, read as it comes, so that a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.lines: list[str] = []
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    def wait_for_line(self, text: str) -> None:
        wait_until(lambda: any(text in line for line in self.lines), f"a log line with {text!r}")

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def exit_code(proc: subprocess.Popen[str], within: float) -> int:
    """The exit code, or a failure naming the bound the process did not exit within (it is killed then)."""
    try:
        return proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the daemon did not exit within {within}s") from None


def put_claim(root: Path, name: str, uid: str, cpus: int, device: str = "cpu-numa0") -> ClaimRef:
    """An allocated claim in the standalone folder, as the scheduler leaves it."""
    FolderClaims(root / "cluster/resourceclaims").put(_claim(name, uid, cpus, device))
    return ClaimRef("default", name, uid)


def claim_yaml(name: str, uid: str, cpus: int, device: str = "cpu-numa0") -> str:
    return yaml.safe_dump(_claim(name, uid, cpus, device))


def _claim(name: str, uid: str, cpus: int, device: str) -> dict[str, Any]:
    return allocated_claim_object("default", name, [result(device, cpus=cpus)], uid=uid)


@dataclass(frozen=True)
class OnDisk:
    """What a daemon left: the checkpoint's claims and its CDI specs' grants, each claim uid -> CPUs."""

    checkpoint: dict[str, CPUSet]
    specs: dict[str, CPUSet]


def on_disk(root: Path) -> OnDisk:
    loaded = CheckpointFile(root / "state").load()
    state = loaded.ledger if loaded is not None else Ledger()
    store = CDIStore(root / "cdi", DRIVER)
    specs = {}
    for uid in store.uids():
        env = cdi_spec.env_of_spec(store.read(uid))
        specs[uid] = CPUSet.parse(env[f"DRA_CPUSET_{uid}"])
    return OnDisk({uid: claim.cpus for uid, claim in state.claims.items()}, specs)


def assert_consistent(disk: OnDisk) -> None:
    """No CPU in two claims, and every prepared claim has exactly its spec (none left without a claim)."""
    seen: dict[int, str] = {}
    for uid, cpus in disk.checkpoint.items():
        for cpu in cpus:
            assert cpu not in seen, f"CPU {cpu} is in claims {seen[cpu]} and {uid}"
            seen[cpu] = uid
    assert disk.specs == disk.checkpoint, f"CDI specs {disk.specs} disagree with the checkpoint {disk.checkpoint}"
