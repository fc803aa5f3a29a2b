"""`dra-cpu run` as a process: start order, kubelet registration, metrics and health endpoints, clean shutdown."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dra_cpu.core.claims import ClaimRef
from dra_cpu.kubelet.client import KubeletClient
from tests.support.kubelet_node import FIXTURES, result
from tests.support.waiting import eventually

UID = "00000000-0000-4000-8000-000000000001"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(root: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "dra_cpu", "run",
            "--node-name", "node-a",
            "--standalone", str(root / "cluster"),
            "--enforcement", "none",
            "--sysfs-root", str(FIXTURES / "dual-socket-smt2"),
            "--kubelet-root-dir", str(root / "kubelet"),
            "--cdi-root", str(root / "cdi"),
            "--state-dir", str(root / "state"),
            "--metrics-address", f"127.0.0.1:{port}",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_daemon_serves_prepares_metrics_and_readiness(root: Path) -> None:
    port = _free_port()
    proc = _run(root, port, "--log-format", "json")
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    try:
        eventually(registration.exists, "the registration socket")
        eventually(lambda: any((root / "cluster/resourceslices").glob("*.yaml")), "the slices")
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and "not registered with the kubelet" in body
        kubelet = KubeletClient.register(registration)
        eventually(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, "readiness")
        assert _get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")

        claim = {
            "metadata": {"name": "c1", "namespace": "default", "uid": UID},
            "status": {"allocation": {"devices": {"results": [result("cpu-numa0", cpus=3)]}}},
        }
        path = root / "cluster/resourceclaims/default/c1.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(claim))
        assert kubelet.prepare([ClaimRef("default", "c1", UID)]).claims[UID].error == ""
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert 'dra_cpu_cpus_allocated{numa_node="0"} 3.0' in metrics
        assert 'dra_cpu_cpus_allocatable{numa_node="1"} 8.0' in metrics
        assert 'dra_cpu_prepare_total{result="success"} 1.0' in metrics
        assert "dra_cpu_active_claims 1.0" in metrics
        assert 'dra_cpu_hugepages_allocatable_bytes{numa_node="0",page_size="2Mi"} 1.34217728e+08' in metrics
        kubelet.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert not registration.exists(), "the kubelet learns the plugin is gone"
    prepare_lines = [line for line in stderr.splitlines() if '"op": "prepare"' in line]
    assert prepare_lines and all(f'"claimUID": "{UID}"' in line and '"opID"' in line for line in prepare_lines)


def test_checkpoint_from_a_bigger_node_does_not_crash_loop(root: Path) -> None:
    """Before: a checkpoint naming CPU 40 on this 16-CPU node made start-up raise KeyError and exit 1, every time."""
    from dra_cpu.core.cpuset import CPUSet
    from dra_cpu.core.state import PreparedClaim, PreparedDevice, State
    from dra_cpu.store.checkpoint import Checkpoint, CheckpointFile

    big_uid, small_uid = "6f1a2b3c-0000-4000-8000-000000000b16", "6f1a2b3c-0000-4000-8000-0000000005aa"

    def claim(name: str, uid: str, cpus: str) -> PreparedClaim:
        device = PreparedDevice(("cpus",), "node-a", "cpu-numa0", None, CPUSet.parse(cpus))
        return PreparedClaim(ClaimRef("default", name, uid), (device,))

    (root / "state").mkdir(mode=0o755)
    state = State({big_uid: claim("big", big_uid, "38-41"), small_uid: claim("small", small_uid, "2")})
    CheckpointFile(root / "state").save(Checkpoint(state, "boot-0"))
    port = _free_port()
    proc = _run(root, port, "--log-format", "json")
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    try:
        eventually(registration.exists, "the registration socket")
        kubelet = KubeletClient.register(registration)
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert "dra_cpu_claims_unrestorable 1.0" in metrics and "dra_cpu_active_claims 1.0" in metrics
        path = root / "cluster/resourceclaims/default/big.yaml"
        path.parent.mkdir(parents=True)
        obj = {
            "metadata": {"name": "big", "namespace": "default", "uid": big_uid},
            "status": {"allocation": {"devices": {"results": [result("cpu-numa0", cpus=4)]}}},
        }
        path.write_text(yaml.safe_dump(obj))
        error = kubelet.prepare([ClaimRef("default", "big", big_uid)]).claims[big_uid].error
        assert "cannot be restored: its CPU(s) 38-41 are not online on this node any more" in error
        for sock in (registration, root / "kubelet/plugins/dra.cpu/dra.sock"):
            assert sock.stat().st_mode & 0o777 == 0o600, sock
        assert (root / "state").stat().st_mode & 0o777 == 0o700
        kubelet.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    lost = [line for line in stderr.splitlines() if "cannot be restored on this node" in line]
    assert len(lost) == 1 and f'"claimUID": "{big_uid}"' in lost[0] and "38-41" in lost[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reserved-cpus", "0-99"], "--reserved-cpus"),
        (["--nri-plugin-index", "7"], "nriPluginIndex '7': must be two digits"),
        (["--min-shared-cpus", "0"], "minSharedCpus 0: at least 1 CPU must stay shared"),
        (["--sysfs-root", "/nonexistent"], "is --sysfs-root right?"),
        (["--metrics-address", "nonsense"], "metricsAddress 'nonsense'"),
    ],
)
def test_bad_settings_exit_2_with_one_line(root: Path, extra: list[str], message: str) -> None:
    proc = _run(root, _free_port(), *extra)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("dra-cpu run:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr


def test_wrong_kubeconfig_is_one_clear_line(root: Path) -> None:
    bad = root / "kubeconfig"
    bad.write_text("this: is not a kubeconfig\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dra_cpu", "run", "--node-name", "n", "--kubeconfig", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_hugepage_reservation_change_is_republished(root: Path) -> None:
    """Hugepage reservations send no uevent: the daemon's poll re-reads sysfs and republishes."""
    sysfs = root / "sysfs"
    shutil.copytree(FIXTURES / "dual-socket-smt2", sysfs)
    nr = sysfs / "sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "dra_cpu", "run",
            "--node-name", "node-a",
            "--standalone", str(root / "cluster"),
            "--enforcement", "none",
            "--sysfs-root", str(sysfs),
            "--kubelet-root-dir", str(root / "kubelet"),
            "--cdi-root", str(root / "cdi"),
            "--state-dir", str(root / "state"),
            "--metrics-address", "127.0.0.1:0",
            "--hugepage-poll-seconds", "0.3",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip

    def capacity() -> str | None:
        for path in (root / "cluster/resourceslices").glob("*.yaml"):
            for device in yaml.safe_load(path.read_text())["spec"]["devices"]:
                if device["name"] == "hugepages-2mi-numa1":
                    return str(device["capacity"]["dra.cpu/memory"]["value"])
        return None

    try:
        eventually(lambda: capacity() == "64Mi", "the first publish")
        nr.write_text("48\n")
        eventually(lambda: capacity() == "96Mi", "the new reservation on the slice")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
