"""handover.py and Driver.follow: a prepared claim goes to the next pod its reservedFor lists once the pod it served
is gone, on the driver's files and pins, without another prepare; a pod that cannot hold it is told why."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.sharing import Holding
from dra_cpu.driver import Driver, Snapshot
from dra_cpu.handover import CHASE_READS, Handover
from tests.harness.claims import FolderClaims, result
from tests.harness.nodes.standin import make_driver
from tests.harness.poll import wait_until
from tests.test_reconciler import RecordingEnforcer

NAME = "shared"
UID = "uid-shared"
REF = ClaimRef("default", NAME, UID)


def _reserve(root: Path, *pods: tuple[str, str]) -> None:
    """The claim, allocated 2 CPUs of NUMA node 0, reserved for `pods` (name, uid) in that order."""
    FolderClaims(root / "cluster/resourceclaims").put(
        {
            "metadata": {"name": NAME, "namespace": "default", "uid": UID},
            "status": {
                "allocation": {"devices": {"results": [result("cpu-numa0", cpus=2)]}},
                "reservedFor": [{"resource": "pods", "name": name, "uid": uid} for name, uid in pods],
            },
        }
    )


def _pod(root: Path, name: str, uid: str, limit: str | None = None) -> None:
    """A pod whose container `app` uses the claim, with limits.cpu `limit`."""
    resources: dict[str, Any] = {"claims": [{"name": "cpus"}]}
    if limit is not None:
        resources["limits"] = {"cpu": limit}
    path = root / "cluster/pods/default" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    pod = {
        "metadata": {"namespace": "default", "name": name, "uid": uid},
        "spec": {
            "resourceClaims": [{"name": "cpus", "resourceClaimName": NAME}],
            "containers": [{"name": "app", "resources": resources}],
        },
    }
    path.write_text(yaml.safe_dump(pod))


def _started(root: Path) -> tuple[Driver, RecordingEnforcer]:
    (root / "state").mkdir()
    driver = make_driver(root, "dual-socket-smt2")
    driver.start()
    enforcer = RecordingEnforcer()
    driver.enforce_with(enforcer)
    return driver, enforcer


def _on_disk(driver: Driver) -> tuple[tuple[str, ...], str]:
    """The pod the checkpoint says the claim serves, and DRA_PODS_ in its CDI spec."""
    saved = driver.reconciler.checkpoint.load()
    assert saved is not None
    spec = json.loads(driver.reconciler.cdi.path(UID).read_text())
    env = dict(e.split("=", 1) for e in spec["devices"][0]["containerEdits"]["env"])
    return saved.ledger.claims[UID].pod_uids, env[f"DRA_PODS_{UID}"]


def test_the_pod_reserved_next_gets_the_claim_once_the_first_is_gone(tmp_path: Path) -> None:
    driver, enforcer = _started(tmp_path)
    _reserve(tmp_path, ("first", "pod-1"), ("second", "pod-2"))
    prepared = driver.prepare([REF])[UID].claim
    # Reserved for two pods at the first prepare: the first one reservedFor lists holds it, nothing is refused.
    assert prepared is not None and prepared.pod_uids == ("pod-1",)
    assert _on_disk(driver) == (("pod-1",), "pod-1")

    # While the first pod is reserved, following the claim changes nothing and writes nothing.
    pins = len(enforcer.pools)
    held = driver.follow(REF)
    assert held == Holding(prepared, {}) and len(enforcer.pools) == pins

    # The first pod ended: the claim controller dropped it from reservedFor.
    _reserve(tmp_path, ("second", "pod-2"))
    _pod(tmp_path, "second", "pod-2")
    held = driver.follow(REF)
    assert held is not None and held.claim.pod_uids == ("pod-2",) and held.claim.cpus == prepared.cpus
    assert _on_disk(driver) == (("pod-2",), "pod-2"), "nothing is left of the first pod"
    assert enforcer.pools[-1].ledger.claims[UID].pod_uids == ("pod-2",), "the pins follow"
    assert driver.snapshot().ledger.claims[UID] == held.claim

    # A claim not prepared here is not followed.
    assert driver.follow(ClaimRef("default", "other", "uid-other")) is None


def test_a_waiting_pod_whose_limit_would_throttle_it_is_told_why_until_resized(tmp_path: Path) -> None:
    driver, _ = _started(tmp_path)
    _reserve(tmp_path, ("first", "pod-1"))
    assert driver.prepare([REF])[UID].claim is not None
    _reserve(tmp_path, ("second", "pod-2"))
    _pod(tmp_path, "second", "pod-2", limit="1")
    held = driver.follow(REF)
    assert held is not None and held.claim.pod_uids == ()
    assert held.unfit == {
        "pod-2": "pod default/second: container 'app' would be CFS-throttled to 1 CPU "
        "(spec.containers[0].resources.limits.cpu 1) on the 2 CPUs claim 'shared' pins it to; raise that limit to "
        "at least 2, or remove it"
    }
    assert _on_disk(driver) == ((), ""), "the claim serves no pod: nothing is left of the first"
    # The pod resized in place: the next follow gives it the claim.
    _pod(tmp_path, "second", "pod-2", limit="2")
    held = driver.follow(REF)
    assert held is not None and held.claim.pod_uids == ("pod-2",) and held.unfit == {}
    assert _on_disk(driver) == (("pod-2",), "pod-2")


def test_a_prepare_passes_over_a_pod_that_would_be_throttled_and_fails_when_every_pod_would(tmp_path: Path) -> None:
    driver, _ = _started(tmp_path)
    _pod(tmp_path, "tight", "pod-1", limit="1")
    _reserve(tmp_path, ("tight", "pod-1"))
    error = driver.prepare([REF])[UID].error
    assert error.startswith("pod default/tight: container 'app' would be CFS-throttled to 1 CPU"), error
    assert driver.snapshot().ledger.claims == {}
    _reserve(tmp_path, ("tight", "pod-1"), ("roomy", "pod-2"))
    prepared = driver.prepare([REF])[UID].claim
    assert prepared is not None and prepared.pod_uids == ("pod-2",)


class CountingDriver:
    """The driver, counting the claims hand-over follows."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.followed: list[ClaimRef] = []

    def snapshot(self) -> Snapshot:
        return self.driver.snapshot()

    def follow(self, ref: ClaimRef) -> Holding | None:
        self.followed.append(ref)
        return self.driver.follow(ref)


@contextlib.contextmanager
def _handing_over(driver: Driver, interval: float) -> Iterator[tuple[CountingDriver, Handover, threading.Event]]:
    """Hand-over running in its thread over `driver`, counted; stopped and joined after."""
    counting = CountingDriver(driver)
    stop = threading.Event()
    handover = Handover(counting, stop, interval=interval)
    thread = threading.Thread(target=handover.run, daemon=True)
    thread.start()
    try:
        yield counting, handover, stop
    finally:
        stop.set()
        handover.close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_refused_containers_have_their_claim_followed_off_the_runtimes_thread_once_per_interval(
    tmp_path: Path,
) -> None:
    driver, _ = _started(tmp_path)
    _reserve(tmp_path, ("first", "pod-1"))
    assert driver.prepare([REF])[UID].claim is not None
    _reserve(tmp_path, ("second", "pod-2"))
    _pod(tmp_path, "second", "pod-2", limit="1")
    with _handing_over(driver, interval=0.5) as (counting, handover, _):
        # Three containers of the waiting pod refused at once: nothing is known yet, one read follows.
        assert [handover.waiting(UID, "pod-2") for _ in range(3)] == ["", "", ""]
        wait_until(lambda: counting.followed == [REF], "the claim followed once")
        wait_until(lambda: "CFS-throttled" in handover.waiting(UID, "pod-2"), "the reason kept for the refusal")
        wait_until(lambda: len(counting.followed) == 2, "the claim followed again, not before the interval")
        _pod(tmp_path, "second", "pod-2", limit="2")
        handover.waiting(UID, "pod-2")
        wait_until(lambda: driver.snapshot().ledger.claims[UID].pod_uids == ("pod-2",), "the claim handed over")
        wait_until(lambda: handover.waiting(UID, "pod-2") == "", "no reason left once the pod holds it")
        # A claim deleted meanwhile is left to the kubelet's unprepare; a claim not prepared is not read.
        (tmp_path / "cluster/resourceclaims/default" / f"{NAME}.yaml").unlink()
        before = len(counting.followed)
        handover.waiting(UID, "pod-3")
        handover.waiting("uid-unknown", "pod-3")
        wait_until(lambda: len(counting.followed) == before + 1, "the deleted claim read once")


def test_a_claim_whose_holder_ended_is_read_until_it_changes_hands_without_another_refusal(tmp_path: Path) -> None:
    driver, _ = _started(tmp_path)
    _reserve(tmp_path, ("first", "pod-1"), ("second", "pod-2"))
    _pod(tmp_path, "second", "pod-2")
    assert driver.prepare([REF])[UID].claim is not None
    with _handing_over(driver, interval=0.2) as (counting, handover, stop):
        # The end of a pod nobody waits behind reads nothing.
        handover.holder_ended("pod-1")
        handover.waiting(UID, "pod-2")
        wait_until(lambda: counting.followed == [REF], "the refused pod's claim read once")
        # Another pod's end reads nothing either.
        handover.holder_ended("pod-9")
        # The holder ended; the claim controller has not dropped it from reservedFor yet: read every interval.
        handover.holder_ended("pod-1")
        wait_until(lambda: len(counting.followed) >= 3, "the claim read again while reservedFor lists the holder")
        assert driver.snapshot().ledger.claims[UID].pod_uids == ("pod-1",)
        _reserve(tmp_path, ("second", "pod-2"))
        wait_until(lambda: driver.snapshot().ledger.claims[UID].pod_uids == ("pod-2",), "the claim handed over")
        # Handed over: no more reads, and no refusal of pod-2 was needed for it.
        settled = len(counting.followed)
        stop.wait(1.0)
        assert len(counting.followed) == settled


def test_reads_after_the_holder_ended_stop_after_chase_reads(tmp_path: Path) -> None:
    driver, _ = _started(tmp_path)
    _reserve(tmp_path, ("first", "pod-1"), ("second", "pod-2"))
    assert driver.prepare([REF])[UID].claim is not None
    with _handing_over(driver, interval=0.05) as (counting, handover, stop):
        handover.waiting(UID, "pod-2")
        wait_until(lambda: len(counting.followed) == 1, "the refused pod's claim read once")
        handover.holder_ended("pod-1")
        wait_until(lambda: len(counting.followed) == 1 + CHASE_READS, "a read per interval, CHASE_READS of them")
        stop.wait(0.5)
        assert len(counting.followed) == 1 + CHASE_READS, "then the next refusal asks again"
