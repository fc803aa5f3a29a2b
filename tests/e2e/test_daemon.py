"""`dra-cpu run` as a process: start order, kubelet registration, metrics and health endpoints, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from dra_cpu import process
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.kubelet.client import KubeletClient
from dra_cpu.kubelet.gen import dra_health_v1_pb2 as health_pb
from tests.harness.claims import result
from tests.harness.nodes.daemon_process import Stderr, exit_code, run_daemon
from tests.harness.nodes.standin import offline_cpus
from tests.harness.paths import SYSFS
from tests.harness.poll import wait_until
from tests.harness.processes import free_port

UID = "00000000-0000-4000-8000-000000000001"


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


def test_daemon_serves_prepares_metrics_and_readiness(root: Path) -> None:
    port = free_port()
    proc = run_daemon(root, port, "--log-format", "json")
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    try:
        wait_until(registration.exists, "the registration socket")
        wait_until(lambda: any((root / "cluster/resourceslices").glob("*.yaml")), "the slices")
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and "not registered with the kubelet" in body
        kubelet = KubeletClient.register(registration)
        wait_until(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, "readiness")
        assert _get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")

        claim = {
            "metadata": {"name": "c1", "namespace": "default", "uid": UID},
            "status": {
                "allocation": {
                    "devices": {"results": [result("cpu-numa0", cpus=3), result("memory-numa0", "mem", memory="100Mi")]}
                }
            },
        }
        path = root / "cluster/resourceclaims/default/c1.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(claim))
        assert kubelet.prepare([ClaimRef("default", "c1", UID)]).claims[UID].error == ""
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert 'dra_cpu_cpus_allocated{numa_node="0"} 3.0' in metrics
        # CPU 0 is held back for containers without claims: what the slices publish, the metric counts.
        assert 'dra_cpu_cpus_allocatable{numa_node="0"} 7.0' in metrics
        assert 'dra_cpu_cpus_allocatable{numa_node="1"} 8.0' in metrics
        assert 'dra_cpu_prepare_total{result="success"} 1.0' in metrics
        assert "dra_cpu_active_claims 1.0" in metrics
        assert 'dra_cpu_hugepages_allocatable_bytes{numa_node="0",page_size="2Mi"} 1.34217728e+08' in metrics
        # dual-socket-smt2: 305Mi of node 0 for claims, 100Mi of it held.
        assert 'dra_cpu_memory_allocatable_bytes{numa_node="0"} 3.1981568e+08' in metrics
        assert 'dra_cpu_memory_allocated_bytes{numa_node="0"} 1.048576e+08' in metrics
        assert 'dra_cpu_memory_allocated_bytes{numa_node="1"} 0.0' in metrics
        for counter in ("forged_env", "shared_claim_refused", "hugetlb_unenforced", "nri_update_failures"):
            assert f"dra_cpu_{counter} 0.0" in metrics, counter
        # The upstream driver's names: 15 published CPUs (CPU 0 stays shared), 3 claimed.
        for upstream in (
            "dra_cpu_allocated_cpus 3.0",
            "dra_cpu_available_cpus 12.0",
            "dra_cpu_reserved_cpus 0.0",
            "dra_cpu_resource_claims_active 1.0",
            'dra_cpu_prepare_claims_total{result="success"} 1.0',
            'dra_cpu_prepare_claims_total{result="unknown"} 0.0',
            "dra_cpu_prepare_claim_duration_seconds_count 1.0",
            'dra_cpu_claim_allocated_cpus_bucket{le="4.0"} 1.0',
            'dra_cpu_claim_allocated_cpus_bucket{le="2.0"} 0.0',
        ):
            assert upstream in metrics, upstream
        # Every metric served is in docs/admin.md's one table.
        admin = (Path(__file__).parents[2] / "docs/admin.md").read_text()
        served = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE ")}
        undocumented = [n for n in served if not n.endswith("_created") and f"`{n}`" not in admin]
        assert not undocumented, undocumented
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
    from dra_cpu.core.ledger import Ledger, PreparedClaim, PreparedDevice
    from dra_cpu.store.checkpoint import Checkpoint, CheckpointFile

    big_uid, small_uid = "6f1a2b3c-0000-4000-8000-000000000b16", "6f1a2b3c-0000-4000-8000-0000000005aa"

    def claim(name: str, uid: str, cpus: str) -> PreparedClaim:
        device = PreparedDevice(("cpus",), "node-a", "cpu-numa0", None, CPUSet.parse(cpus))
        return PreparedClaim(ClaimRef("default", name, uid), (device,))

    (root / "state").mkdir(mode=0o755)
    state = Ledger({big_uid: claim("big", big_uid, "38-41"), small_uid: claim("small", small_uid, "2")})
    CheckpointFile(root / "state").save(Checkpoint(state, "boot-0"))
    port = free_port()
    proc = run_daemon(root, port, "--log-format", "json")
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    try:
        wait_until(registration.exists, "the registration socket")
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
        (["--reserved-cpus", "0-99"], "reservedCpus 0-99: CPU(s) 16-99 do not exist on this node (present: 0-15)"),
        (
            ["--min-shared-cpus", "17"],
            "minSharedCpus 17: this node has 16 CPU(s) to share (online 0-15, isolated none, reservedCpus none); "
            "keeping 17 for containers without claims leaves no CPU outside isolcpus for claims",
        ),
        (["--nri-plugin-index", "7"], "nriPluginIndex '7': must be two digits"),
        (["--min-shared-cpus", "0"], "minSharedCpus 0: at least 1 CPU must stay shared"),
        (["--sysfs-root", "/nonexistent"], "is --sysfs-root right?"),
        (["--metrics-address", "nonsense"], "metricsAddress 'nonsense'"),
    ],
)
def test_bad_settings_exit_2_with_one_line(root: Path, extra: list[str], message: str) -> None:
    proc = run_daemon(root, free_port(), *extra)
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
    shutil.copytree(SYSFS / "dual-socket-smt2", sysfs)
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
        wait_until(lambda: capacity() == "64Mi", "the first publish")
        nr.write_text("48\n")
        wait_until(lambda: capacity() == "96Mi", "the new reservation on the slice")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


def test_health_follows_the_node_through_re_discovery(root: Path) -> None:
    """The daemon's own re-discovery (the sysfs poll) drives the kubelet's v1 health stream: CPUs taken offline make
    their device Unhealthy with the reason, a sysfs the daemon cannot read makes every device Unknown."""
    sysfs = root / "sysfs"
    shutil.copytree(SYSFS / "dual-socket-smt2", sysfs)
    proc = run_daemon(root, free_port(), "--hugepage-poll-seconds", "0.3", sysfs=sysfs)
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    try:
        wait_until(registration.exists, "the registration socket")
        kubelet = KubeletClient.register(registration)
        assert kubelet.health_service == "v1.DRAResourceHealth"
        stream = kubelet.watch_health(timeout=30)

        def until(wanted: Callable[[dict[str, tuple[int, str]]], bool]) -> dict[str, tuple[int, str]]:
            for response in stream:
                health = {d.device.device_name: (d.health, d.message) for d in response.devices}
                if wanted(health):
                    return health
            raise AssertionError("the stream ended")

        until(lambda h: {s for s, _ in h.values()} == {health_pb.HEALTHY})
        offline_cpus(CPUSet.parse("14-15"))(sysfs)
        health = until(lambda h: h["cpu-numa1"][0] == health_pb.UNHEALTHY)
        assert health["cpu-numa1"][1] == "CPUs 14-15 are offline"
        assert health["cpu-numa0"] == (health_pb.HEALTHY, "")
        (sysfs / "sys/devices/system/cpu/online").write_text("not a list\n")
        health = until(lambda h: {s for s, _ in h.values()} == {health_pb.UNKNOWN})
        assert all("re-discovery of the node's topology fails" in m for _, m in health.values())
        stream.cancel()
        kubelet.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


def test_a_node_shrunk_below_the_settings_is_reported_not_fatal(root: Path) -> None:
    """minSharedCpus 4 on 16 CPUs: fine at start. 12 CPUs go offline: the re-discovery logs one line naming the
    setting and the node's numbers, the daemon goes on and publishes no CPU device, and the CPUs come back."""
    sysfs = root / "sysfs"
    shutil.copytree(SYSFS / "dual-socket-smt2", sysfs)
    proc = run_daemon(root, free_port(), "--hugepage-poll-seconds", "0.3", "--min-shared-cpus", "4", sysfs=sysfs)
    stderr = Stderr(proc)

    def cpu_devices() -> list[str]:
        slices = [yaml.safe_load(p.read_text()) for p in (root / "cluster/resourceslices").glob("*.yaml")]
        return sorted(d["name"] for s in slices for d in s["spec"]["devices"] if d["name"].startswith("cpu-"))

    try:
        wait_until(lambda: bool(cpu_devices()), "the first publish")
        published = cpu_devices()
        before = root / "sysfs-before"
        shutil.copytree(sysfs, before)
        offline_cpus(CPUSet.parse("4-15"))(sysfs)
        stderr.wait_for_line("minSharedCpus 4: this node has 4 CPU(s) to share (online 0-3, isolated none")
        wait_until(lambda: cpu_devices() == [], "the CPU devices withdrawn")
        assert proc.poll() is None, "the daemon goes on"
        shutil.copytree(before, sysfs, dirs_exist_ok=True)
        (sysfs / "sys/devices/system/cpu/offline").unlink()
        wait_until(lambda: cpu_devices() == published, "the CPU devices back")
    finally:
        proc.send_signal(signal.SIGTERM)
    assert exit_code(proc, 30) == 0, stderr.text()
    reports = [line for line in stderr.text().splitlines() if "contradict the node as re-discovered" in line]
    assert len(reports) == 1, reports


def test_pcie_roots_are_published_and_follow_sysfs(root: Path) -> None:
    """--publish-pcie-roots: the daemon reads the roots (the expander capture) and republishes when they change."""
    sysfs = root / "sysfs"
    shutil.copytree(SYSFS / "pcie-expander-3numa", sysfs)
    proc = run_daemon(root, free_port(), "--publish-pcie-roots", "--hugepage-poll-seconds", "0.3", sysfs=sysfs)

    def roots() -> dict[str, list[str]]:
        return {
            device["name"]: device["attributes"]["resource.kubernetes.io/pcieRoot"]["strings"]
            for path in (root / "cluster/resourceslices").glob("*.yaml")
            for device in yaml.safe_load(path.read_text())["spec"]["devices"]
            if "resource.kubernetes.io/pcieRoot" in device["attributes"]
        }

    try:
        first = {"cpu-numa0": ["pci0000:00", "pci0000:10"], "cpu-numa1": ["pci0000:00", "pci0000:20"]}
        wait_until(lambda: roots() == first, "the first publish with the roots")
        shutil.rmtree(sysfs / "sys/devices/pci0000:20")
        wait_until(lambda: roots() == {**first, "cpu-numa1": ["pci0000:00"]}, "the root gone from cpu-numa1")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


def test_sigterm_at_any_moment_ends_the_daemon_cleanly_once(root: Path) -> None:
    """SIGTERM at random moments of start-up and service, and again while it shuts down: one shutdown, exit 0."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    for attempt in range(5):
        proc = run_daemon(root, free_port())
        stderr = Stderr(proc)
        try:
            # The handlers are in place before the first log line; before it the interpreter is still starting.
            stderr.wait_for_line("starting")
            time.sleep(rng.uniform(0, 2.5))  # the random moment, not a synchronisation
            proc.send_signal(signal.SIGTERM)
            time.sleep(rng.uniform(0, 0.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = exit_code(proc, process.SHUTDOWN_SECONDS + 10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log = stderr.text()
        assert code == 0, f"seed {seed}, attempt {attempt}: exit {code}\n{log}"
        assert "Traceback" not in log and log.count("received: shutting down") == 1, f"seed {seed}\n{log}"
        assert not registration.exists()


def _stuck_prepare(root: Path) -> tuple[subprocess.Popen[str], Stderr, threading.Thread]:
    """A daemon with a prepare in flight that never ends: the claim is a FIFO nobody writes, as a request to an
    API server that accepted the connection and then went silent."""
    claim = root / "cluster/resourceclaims/default/stuck.yaml"
    claim.parent.mkdir(parents=True)
    os.mkfifo(claim)
    proc = run_daemon(root, free_port(), "--log-level", "debug")
    stderr = Stderr(proc)
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    wait_until(registration.exists, "the registration socket")
    kubelet = KubeletClient.register(registration)

    def prepare() -> None:
        with contextlib.suppress(grpc.RpcError):
            kubelet.prepare([ClaimRef("default", "stuck", "5d0c7a9e-0000-4000-8000-00000057c0c0")], timeout=60)
        kubelet.close()

    caller = threading.Thread(target=prepare, daemon=True)
    caller.start()
    stderr.wait_for_line("reading the claim")
    return proc, stderr, caller


def test_a_hung_request_does_not_hold_the_exit(root: Path) -> None:
    proc, stderr, caller = _stuck_prepare(root)
    try:
        proc.send_signal(signal.SIGTERM)
        code = exit_code(proc, process.SHUTDOWN_SECONDS + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = stderr.text()
    assert code == 0, log
    assert "shutdown did not end in time" not in log and "Traceback" not in log
    assert not (root / "kubelet/plugins_registry/dra.cpu-reg.sock").exists()
    caller.join(timeout=10)


@pytest.mark.parametrize(
    ("signals", "code"),
    [((signal.SIGTERM, signal.SIGTERM, signal.SIGTERM), 128 + signal.SIGTERM), ((signal.SIGTERM, signal.SIGINT), 130)],
)
def test_a_third_signal_or_sigint_during_the_shutdown_exits_at_once(
    root: Path, signals: tuple[signal.Signals, ...], code: int
) -> None:
    proc, stderr, caller = _stuck_prepare(root)
    try:
        started = time.monotonic()
        for sent, sig in enumerate(signals):
            proc.send_signal(sig)
            if sent == 0:
                stderr.wait_for_line("SIGTERM received: shutting down")
            elif sent < len(signals) - 1:
                stderr.wait_for_line("already shutting down")
        assert exit_code(proc, process.SHUTDOWN_SECONDS + 10) == code, stderr.text()
        assert time.monotonic() - started < process.SHUTDOWN_SECONDS, "before the shutdown's own deadline"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "during the shutdown: exiting at once" in stderr.text()
    caller.join(timeout=10)


def test_the_signal_handler_takes_no_lock() -> None:
    """Python runs a signal handler on the main thread between two bytecodes, also while that thread holds a lock:
    here the stop event's own, as inside Event.set() during the shutdown. A handler that sets the event there waits
    for itself forever (the hang seen once with a second SIGTERM)."""
    script = textwrap.dedent(
        """
        import os, signal
        from dra_cpu.config import Config
        from dra_cpu.daemon import Daemon

        d = Daemon(Config(node_name="n"))
        d.process.install_signals()
        with d.stop._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        assert d.stop.wait(10)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the signal handler deadlocked on the stop event") from None
    assert proc.returncode == 0, stderr
