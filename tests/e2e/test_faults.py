"""The daemon under faults: its state folder full or read-only, its CDI folder full or read-only, the cluster gone
or silent mid-request, the NRI connection closed mid-call, SIGTERM at any moment. Whatever happens, no CPU is in
two claims, no acknowledged claim is lost, checkpoint and CDI specs agree, every failed prepare says why, and the
daemon recovers or exits within a bound."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dra_cpu import process
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.desired import pins
from dra_cpu.kubelet.client import KubeletClient
from dra_cpu.nri.enforcer import NriConfig, NriEnforcer
from dra_cpu.nri.gen import nri_ttrpc_pb2
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.store.checkpoint import SPARE
from tests.harness.nodes.daemon_process import (
    Stderr,
    assert_consistent,
    claim_yaml,
    exit_code,
    on_disk,
    put_claim,
    registration_socket,
    run_daemon,
)
from tests.harness.nodes.standin import make_driver
from tests.harness.poll import wait_until
from tests.harness.processes import free_port
from tests.harness.runtimes.nri_peer import Runtime

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
EXIT_BOUND = process.SHUTDOWN_SECONDS + 10
DEVICES = ("cpu-numa0", "cpu-numa1")


def uid_of(name: str) -> str:
    """A claim uid as the API server makes them (a UUID), fixed per name."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dra-cpu-test/{name}"))


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(path: Path) -> Path:
    """Fill the file system of `path` to the last byte; remove the returned file to free it."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    return filler


@dataclass
class Running:
    root: Path
    proc: subprocess.Popen[str]
    stderr: Stderr
    kubelet: KubeletClient

    def prepare(self, ref: ClaimRef, timeout: float = 30) -> str:
        return str(self.kubelet.prepare([ref], timeout=timeout).claims[ref.uid].error)

    def unprepare(self, ref: ClaimRef) -> str:
        return str(self.kubelet.unprepare([ref], timeout=30).claims[ref.uid].error)

    def stop(self) -> None:
        self.kubelet.close()
        self.proc.send_signal(signal.SIGTERM)
        code = exit_code(self.proc, EXIT_BOUND)
        log = self.stderr.text()
        assert code == 0 and "Traceback" not in log, log


def start(root: Path, *extra: str) -> Running:
    proc = run_daemon(root, free_port(), *extra)
    stderr = Stderr(proc)
    try:
        wait_until(lambda: registration_socket(root).exists() or proc.poll(), "the registration socket")
        assert proc.poll() is None, stderr.text()
        return Running(root, proc, stderr, KubeletClient.register(registration_socket(root)))
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="df-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
@pytest.mark.parametrize(
    ("folder", "fault", "message", "unprepare_fails"),
    [
        ("state", "full", "No space left on device", True),
        ("state", "read-only", "Read-only file system", True),
        ("cdi", "full", "No space left on device", False),  # removing a file needs no space
        ("cdi", "read-only", "Read-only file system", True),
    ],
)
def test_a_full_or_read_only_folder_fails_the_claim_and_applies_nothing(
    root: Path, folder: str, fault: str, message: str, unprepare_fails: bool
) -> None:
    with tmpfs(root / "state"), tmpfs(root / "cdi"):
        node = start(root)
        try:
            held = put_claim(root, "held", uid_of("held"), cpus=2)
            assert node.prepare(held) == ""
            before = on_disk(root)
            filler: Path | None = None
            if fault == "full":
                if folder == "state":
                    # A checkpoint save that fits in the pages of the spare file, which it rewrites in place, needs
                    # no space and succeeds on a full folder; without the spare it needs a page.
                    (root / "state" / SPARE).unlink()
                filler = fill(root / folder)
            else:
                remount(root / folder, "ro")

            new = put_claim(root, "new", uid_of("new"), cpus=2)
            error = node.prepare(new)
            assert message in error and ("checkpoint" if folder == "state" else "CDI spec") in error, error
            assert on_disk(root) == before, "the failed prepare left nothing behind"
            assert node.prepare(held) == "", "a prepared claim is still answered (kubelet retry)"
            error = node.unprepare(held)
            if unprepare_fails:
                assert message in error, error
                assert on_disk(root) == before, "the failed unprepare left the claim whole"
            else:
                assert error == ""
                assert on_disk(root).checkpoint == {}

            if filler is not None:
                filler.unlink()
            else:
                remount(root / folder, "rw")
            assert node.prepare(new) == ""
            assert node.unprepare(held) == ""
            after = on_disk(root)
            assert set(after.checkpoint) == {uid_of("new")}
            assert_consistent(after)
        finally:
            node.stop()
        # What a restarted daemon finds is what the last one acknowledged.
        assert_consistent(on_disk(root))
        assert set(on_disk(root).checkpoint) == {uid_of("new")}


def test_the_cluster_gone_or_silent_mid_request(root: Path) -> None:
    node = start(root, "--log-level", "debug")
    try:
        held = put_claim(root, "held", uid_of("held"), cpus=2)
        assert node.prepare(held) == ""
        before = on_disk(root)

        # Gone: the claim cannot be read at all.
        claims = root / "cluster/resourceclaims"
        claims.rename(root / "cluster/moved")
        claims.write_text("not a folder")
        gone = ClaimRef("default", "held", uid_of("other"))
        error = node.prepare(gone)
        assert "cannot read" in error and "held.yaml" in error, error
        assert on_disk(root) == before
        claims.unlink()
        (root / "cluster/moved").rename(claims)

        # Silent: the request is accepted and never answered; the kubelet gives up, other claims go on.
        stuck_path = claims / "default/stuck.yaml"
        os.mkfifo(stuck_path)
        stuck = ClaimRef("default", "stuck", uid_of("stuck"))
        with pytest.raises(grpc.RpcError) as gave_up:
            node.prepare(stuck, timeout=2)
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        other = put_claim(root, "other", uid_of("other"), cpus=2)
        assert node.prepare(other) == "", "a silent request holds no lock other claims need"

        # The cluster answers at last: the abandoned prepare completes, and the kubelet's retry gets the same CPUs.
        answer = claim_yaml("stuck", uid_of("stuck"), cpus=2)
        with stuck_path.open("w") as fifo:
            fifo.write(answer)
        wait_until(lambda: uid_of("stuck") in on_disk(root).checkpoint, "the abandoned prepare to complete")
        stuck_path.unlink()
        stuck_path.write_text(answer)
        cpus = on_disk(root).checkpoint[uid_of("stuck")]
        assert node.prepare(stuck) == ""
        assert on_disk(root).checkpoint[uid_of("stuck")] == cpus
        assert_consistent(on_disk(root))
    finally:
        node.stop()


def test_sigterm_at_random_moments_of_a_prepare_stream(root: Path) -> None:
    """The daemon is stopped at random moments while a kubelet prepares and unprepares, and started again: what
    was acknowledged stays acknowledged, with the same CPUs, and nothing is double-booked."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    acknowledged: dict[str, CPUSet] = {}  # uid -> CPUs, for prepares answered without error and not unprepared
    refs: dict[str, ClaimRef] = {}
    for attempt in range(4):
        node = start(root)
        stop = threading.Event()

        def churn(node: Running = node, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    if len(acknowledged) >= 4 or (acknowledged and rng.random() < 0.3):
                        uid = rng.choice(sorted(acknowledged))
                        if node.unprepare(refs[uid]) == "":
                            del acknowledged[uid]
                    else:
                        uid = str(uuid.uuid4())
                        refs[uid] = put_claim(root, uid, uid, cpus=rng.choice((1, 2)), device=rng.choice(DEVICES))
                        if node.prepare(refs[uid]) == "":
                            acknowledged[uid] = on_disk(root).checkpoint[uid]
                except grpc.RpcError:
                    return  # the daemon went away mid-call: that call's outcome is unknown, as for a kubelet

        worker = threading.Thread(target=churn, daemon=True)
        worker.start()
        time.sleep(rng.uniform(0.2, 2.0))  # the random moment, not a synchronisation
        node.proc.send_signal(signal.SIGTERM)
        code = exit_code(node.proc, EXIT_BOUND)
        stop.set()
        worker.join(timeout=60)
        assert not worker.is_alive()
        log = node.stderr.text()
        assert code == 0 and "Traceback" not in log, f"seed {seed}, attempt {attempt}\n{log}"
        disk = on_disk(root)
        assert_consistent(disk)
        for uid, cpus in acknowledged.items():
            assert disk.checkpoint.get(uid) == cpus, f"seed {seed}: acknowledged claim {uid} lost or moved"
        # A prepare whose answer never came may have happened: the kubelet would retry or unprepare it.
        acknowledged.update({uid: disk.checkpoint[uid] for uid in disk.checkpoint if uid not in acknowledged})


def test_nri_connection_closed_mid_call(tmp_path: Path) -> None:
    """The runtime drops the connection in the middle of the shared-pool update a prepare caused: the prepare
    stands, prepares go on within the grace period and fail clearly after it, and the reconnection's
    Synchronize brings every container to the state's pins."""
    driver = make_driver(tmp_path, "dual-socket-smt2")
    (tmp_path / "state").mkdir()
    driver.start()
    runtime = Runtime(tmp_path / "nri.sock")
    enforcer = NriEnforcer(
        NriConfig(socket=tmp_path / "nri.sock", plugin_index="07", backoff_max=0.2, grace_seconds=1.0),
        pins(driver.snapshot().ledger, driver.snapshot().view),
    )
    driver.enforce_with(enforcer)
    enforcer.start()
    pod = api.PodSandbox(id="sandbox-1", uid="pod-1", name="p", namespace="ns")
    plain = api.Container(id="plain", pod_sandbox_id=pod.id, name="plain", state=api.CONTAINER_RUNNING)
    try:
        runtime.accept()
        runtime.call("Synchronize", api.SynchronizeRequest(pods=[pod], containers=[plain]), api.SynchronizeResponse)
        assert enforcer.ready.is_set()

        first = put_claim(tmp_path, "first", uid_of("first"), cpus=2)
        assert driver.prepare([first])[first.uid].error == ""
        assert runtime.peer is not None
        call = runtime.peer.read()  # the updater's UpdateContainers for the shrunk shared pool...
        request = api.UpdateContainersRequest.FromString(nri_ttrpc_pb2.Request.FromString(call.payload).payload)
        assert [u.container_id for u in request.update] == ["plain"]
        runtime.peer.sock.close()  # ...and the runtime goes away before answering it
        wait_until(lambda: not enforcer.ready.is_set(), "the plugin to notice the closed connection")

        within = put_claim(tmp_path, "within", uid_of("within"), cpus=1)
        assert driver.prepare([within])[within.uid].error == "", "a runtime restart within the grace period"
        time.sleep(1.1)  # past the grace period: the duration itself is what is tested
        late = put_claim(tmp_path, "late", uid_of("late"), cpus=1)
        error = driver.prepare([late])[late.uid].error
        assert "CPU pinning is not enforced" in error, error
        assert uid_of("late") not in driver.snapshot().ledger.claims

        runtime.accept()
        synced = runtime.call(
            "Synchronize", api.SynchronizeRequest(pods=[pod], containers=[plain]), api.SynchronizeResponse
        )
        assert isinstance(synced, api.SynchronizeResponse)
        now = driver.snapshot()
        shared = pins(now.ledger, now.view).shared
        assert {u.container_id: u.linux.resources.cpu.cpus for u in synced.update} == {"plain": str(shared)}
        assert shared.isdisjoint(now.ledger.allocated_cpus)
        disk = on_disk(tmp_path)
        assert_consistent(disk)
        assert set(disk.checkpoint) == {uid_of("first"), uid_of("within")}
    finally:
        enforcer.stop()
        runtime.listener.close()
