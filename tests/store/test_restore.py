"""State that enters the process is checked against the node: a checkpoint or CDI specs naming CPUs the node no
longer has, or booking the same CPUs or hugepages twice, start the driver with every claim it can keep and a
report (log line, checkpoint entry, per-claim prepare error) for each one it cannot."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import HugePageGrant, Ledger, MemoryGrant, PreparedClaim, PreparedDevice, Unrestorable
from dra_cpu.core.memory import MemoryBinding, parse_reserved_memory
from dra_cpu.driver import Driver
from dra_cpu.store.checkpoint import Checkpoint, CheckpointFile
from tests.harness.claims import result
from tests.harness.nodes.standin import make_driver, write_claim

FIXTURE = "dual-socket-smt2"  # CPUs 0-15: node0 0-7, node1 8-15; 2Mi pages: 128Mi on node0, 64Mi on node1


def _cpus(uid: str, cpus: str, device: str = "cpu-numa0") -> PreparedClaim:
    return PreparedClaim(
        ClaimRef("default", uid, uid), (PreparedDevice(("cpus",), "node-a", device, "s", CPUSet.parse(cpus)),)
    )


def _pages(uid: str, node: int, size_kib: int, nbytes: int) -> PreparedClaim:
    grant = HugePageGrant(node, size_kib, nbytes)
    device = PreparedDevice(("mem",), "node-a", f"hugepages-2mi-numa{node}", None, hugepages=grant)
    return PreparedClaim(ClaimRef("default", uid, uid), (device,))


def _memory(uid: str, *grants: tuple[int, int]) -> PreparedClaim:
    devices = tuple(
        PreparedDevice(("mem",), "node-a", f"memory-numa{node}", None, memory=MemoryGrant(node, nbytes))
        for node, nbytes in grants
    )
    return PreparedClaim(ClaimRef("default", uid, uid), devices)


def _start_with(root: Path, *claims: PreparedClaim, fixture: str = FIXTURE, reserved_memory: str = "5%") -> Driver:
    (root / "state").mkdir(parents=True, exist_ok=True)
    CheckpointFile(root / "state").save(Checkpoint(Ledger({c.uid: c for c in claims}), "boot-1"))
    driver = make_driver(root, fixture, reserved_memory=parse_reserved_memory(reserved_memory))
    driver.start()
    return driver


def test_checkpoint_naming_vanished_cpus_starts_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: start() raised KeyError on CPU 16 (a VM shrunk across a reboot): exit 1 on every restart."""
    with caplog.at_level(logging.ERROR):
        driver = _start_with(
            tmp_path,
            _cpus("kept", "2-3"),
            _cpus("shrunk", "14-17", "cpu-numa1"),
            _pages("no-node", 5, 2048, 4 << 20),
            _pages("no-pool", 0, 1024, 4 << 20),
        )
    assert set(driver.snapshot().ledger.claims) == {"kept"} and driver.snapshot().ledger.claims[
        "kept"
    ].cpus == CPUSet.parse("2-3")
    reasons = {uid: lost.reason for uid, lost in driver.snapshot().ledger.unrestorable.items()}
    assert reasons == {
        "shrunk": "its CPU(s) 16-17 are not online on this node any more (online: 0-15)",
        "no-node": "its 4Mi of 2Mi hugepages on NUMA node 5: this node has no such hugepage pool any more",
        "no-pool": "its 4Mi of 1Mi hugepages on NUMA node 0: this node has no such hugepage pool any more",
    }
    logged = {r.__dict__.get("claimUID") for r in caplog.records if "cannot be restored" in r.getMessage()}
    assert logged == {"shrunk", "no-node", "no-pool"}
    # Only the kept claim has a spec; the checkpoint remembers the reports.
    assert set(driver.reconciler.cdi.uids()) == {"kept"}
    saved = CheckpointFile(tmp_path / "state").load()
    assert saved is not None and set(saved.ledger.unrestorable) == {"shrunk", "no-node", "no-pool"}

    # The kubelet's next prepare of a dropped claim gets a clear per-claim error; the others are unaffected.
    ref = write_claim(tmp_path, "shrunk", [result("cpu-numa1", cpus=4)])
    kept = write_claim(tmp_path, "kept", [result("cpu-numa0", cpus=2)])
    results = driver.prepare([ref, kept])
    assert results["shrunk"].claim is None
    assert results["shrunk"].error == (
        "claim default/shrunk was prepared on this node before the driver restarted and cannot be restored: its "
        "CPU(s) 16-17 are not online on this node any more (online: 0-15). Delete its pod: the kubelet then "
        "unprepares the claim here"
    )
    assert results["kept"].claim is not None and results["kept"].claim.cpus == CPUSet.parse("2-3")

    # A second restart still reports it; the kubelet's unprepare ends the report, and a new prepare is decided anew.
    again = make_driver(tmp_path, FIXTURE)
    again.start()
    assert set(again.snapshot().ledger.unrestorable) == {"shrunk", "no-node", "no-pool"}
    assert again.unprepare([ref]) == {"shrunk": ""}
    assert "shrunk" not in again.snapshot().ledger.unrestorable
    fresh = again.prepare([ref])["shrunk"]
    assert fresh.claim is not None and len(fresh.claim.cpus) == 4 and not fresh.claim.cpus - CPUSet.parse("8-15")


def test_smt_turned_off_drops_only_claims_on_the_lost_siblings(tmp_path: Path) -> None:
    from tests.harness.synthetic_sysfs import uniform_machine, write_tree

    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=4, threads=2)
    smt_on = write_tree(tmp_path / "smt-on", cpus, nodes)
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=4, threads=1)
    smt_off = write_tree(tmp_path / "smt-off", cpus, nodes)
    driver = _start_with(tmp_path, _cpus("thread0", "0"), _cpus("sibling", "1,9"), fixture=str(smt_on))
    assert set(driver.snapshot().ledger.claims) == {"thread0", "sibling"}
    driver = make_driver(tmp_path, str(smt_off))
    driver.start()
    assert set(driver.snapshot().ledger.claims) == {"thread0"}
    assert driver.snapshot().ledger.unrestorable["sibling"].reason.startswith("its CPU(s) 9 are not online")


def test_double_booked_checkpoint_keeps_the_first_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a checksum-valid checkpoint with two claims on CPUs 3-4, and 128Mi + 128Mi of a 128Mi pool, was
    served as is."""
    with caplog.at_level(logging.ERROR):
        driver = _start_with(
            tmp_path,
            _cpus("a", "2-4"),
            _cpus("b", "3-5"),
            _cpus("c", "6"),
            _pages("p1", 0, 2048, 128 << 20),
            _pages("p2", 0, 2048, 2 << 20),
            _pages("p3", 1, 2048, 64 << 20),
        )
    assert set(driver.snapshot().ledger.claims) == {"a", "c", "p1", "p3"}
    assert driver.snapshot().ledger.unrestorable["b"].reason == (
        "its CPU(s) 3-4 are also held by claim default/a (uid a), which is kept"
    )
    assert driver.snapshot().ledger.unrestorable["p2"].reason == (
        "its 2Mi of 2Mi hugepages on NUMA node 0: with the 128Mi held by claims kept before it, that exceeds the "
        "128Mi reserved"
    )
    assert {r.__dict__.get("claimUID") for r in caplog.records if "cannot be restored" in r.getMessage()} == {
        "b",
        "p2",
    }
    # The spec that pointed b's containers at a's CPUs is gone.
    assert set(driver.reconciler.cdi.uids()) == {"a", "c", "p1", "p3"}


def test_corrupt_checkpoint_and_cdi_specs_sharing_cpus(tmp_path: Path) -> None:
    """Before: two specs naming CPU 3 were both rebuilt into the state after the checkpoint was lost."""
    driver = _start_with(tmp_path, _cpus("a", "2-3"))
    spec = json.loads(driver.reconciler.cdi.path("a").read_text())
    text = json.dumps(spec).replace("DRA_CPUSET_a=2-3", "DRA_CPUSET_b=3-4").replace("_a=", "_b=")
    driver.reconciler.cdi.path("b").write_text(text.replace("claim-a", "claim-b").replace("default/a", "default/b"))
    (tmp_path / "state/checkpoint.json").write_text("{")
    again = make_driver(tmp_path, FIXTURE)
    again.start()
    assert {u: str(c.cpus) for u, c in again.snapshot().ledger.claims.items()} == {"a": "2-3"}
    assert (
        again.snapshot().ledger.unrestorable["b"].reason
        == "its CPU(s) 3 are also held by claim default/a (uid a), which is kept"
    )
    assert set(again.reconciler.cdi.uids()) == {"a"}


def test_unrestorable_reports_round_trip_and_old_files_still_load(tmp_path: Path) -> None:
    from dra_cpu.store.checkpoint import decode, encode

    state = Ledger({"a": _cpus("a", "1")}, {"b": Unrestorable(ClaimRef("ns", "b", "b"), "its CPU(s) 99 ...")})
    assert decode(encode(Checkpoint(state, "x")), "f") == Checkpoint(state, "x")
    plain = encode(Checkpoint(Ledger({"a": _cpus("a", "1")}), "x"))
    assert b"unrestorable" not in plain, "a file without reports stays readable by older drivers"
    tampered = encode(Checkpoint(state, "x")).replace(b"99", b"98")
    from dra_cpu.store.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="checksum mismatch"):
        decode(tampered, "f")


def test_memory_is_restored_within_what_the_node_has_for_claims_now(tmp_path: Path) -> None:
    """dual-socket-smt2 has 305Mi for claims on node 0 and 412Mi on node 1 (5 % reserved). Restarted with 150Mi
    reserved on every node (178Mi and 287Mi left), as after an admin raised the reservation or the node's memory
    shrank: the claims that no longer fit beside those kept before them are dropped, whole, with the reason; a node
    that publishes no memory any more drops its claims too."""
    claims = (  # the checkpoint lists them by uid
        _memory("a-small", (0, 100 << 20)),
        _memory("b-big", (0, 100 << 20), (1, 10 << 20)),
        _memory("c-fits", (0, 78 << 20), (1, 200 << 20)),
        _memory("d-gone", (3, 1 << 20)),
    )
    assert set(_start_with(tmp_path / "before", *claims).snapshot().ledger.claims) == {"a-small", "b-big", "c-fits"}
    ledger = _start_with(tmp_path / "after", *claims, reserved_memory="150Mi").snapshot().ledger
    assert set(ledger.claims) == {"a-small", "c-fits"}
    assert ledger.allocated_memory == {0: 178 << 20, 1: 200 << 20}
    assert ledger.unrestorable["b-big"].reason == (
        "its 100Mi of memory on NUMA node 0: with the 100Mi held by claims kept before it, that exceeds the 178Mi it "
        "has for claims"
    )
    assert ledger.unrestorable["d-gone"].reason == (
        "its 1Mi of memory on NUMA node 3: this node has no memory for claims there any more"
    )


def test_memory_and_its_binding_are_rebuilt_from_the_cdi_specs(tmp_path: Path) -> None:
    """A corrupt checkpoint: each claim's memory per node and its binding come back from its CDI spec."""
    from tests.harness.claims import cpu_config

    (tmp_path / "state").mkdir()
    driver = make_driver(tmp_path, FIXTURE)
    driver.start()
    memory = write_claim(
        tmp_path, "memory", [result("memory-numa0", "mem", memory="64Mi"), result("memory-numa1", "mem", memory="8Mi")]
    )
    strict = write_claim(tmp_path, "strict", [result("cpu-numa1", cpus=2)])
    path = tmp_path / "cluster/resourceclaims/default/strict.yaml"
    claim = yaml.safe_load(path.read_text())
    claim["status"]["allocation"]["devices"]["config"] = [cpu_config(memoryBinding="strict")]
    path.write_text(yaml.safe_dump(claim))
    prepared = {uid: r.claim for uid, r in driver.prepare([memory, strict]).items()}
    assert all(prepared.values())
    (tmp_path / "state/checkpoint.json").write_text("{")

    again = make_driver(tmp_path, FIXTURE)
    again.start()
    rebuilt = again.snapshot().ledger.claims
    assert rebuilt["memory"].memory == prepared["memory"].memory  # type: ignore[union-attr]
    assert (rebuilt["memory"].binding, rebuilt["strict"].binding) == (MemoryBinding.STRICT, MemoryBinding.STRICT)
    assert again.snapshot().ledger.allocated_memory == {0: 64 << 20, 1: 8 << 20}
