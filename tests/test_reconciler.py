"""reconciler.py: one order, with rollback, after every decision and at start. Metadata files are part of it: an
unprepare that cannot remove them leaves the claim prepared whole; start-up adopts the files of claims whose record
does not name them; a changed claim (other pods) gets its spec rewritten and the pins follow."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.device_metadata import MetadataError
from dra_cpu.core.entitlement import Pools
from dra_cpu.driver import Driver
from dra_cpu.logs import operation
from dra_cpu.store.checkpoint import VERSION
from dra_cpu.store.metadata_files import MetadataStore
from tests.harness.claims import DRIVER, result
from tests.harness.nodes.standin import make_driver, write_claim


@dataclass(frozen=True)
class UnremovableMetadata(MetadataStore):
    """A metadata folder whose files cannot be removed (a read-only or failing disk)."""

    def remove(self, ref: ClaimRef, requests: Iterable[str] | None = None) -> None:
        raise MetadataError(f"cannot remove device metadata of claim {ref}: read-only file system")


@dataclass
class RecordingEnforcer:
    pools: list[Pools] = field(default_factory=list)

    def check_ready(self) -> None:
        pass

    def set_pools(self, pools: Pools) -> None:
        self.pools.append(pools)


def _started(root: Path) -> Driver:
    (root / "state").mkdir(exist_ok=True)
    driver = make_driver(root, "dual-socket-smt2")
    driver.start()
    return driver


def _prepared(driver: Driver, root: Path, uid: str) -> ClaimRef:
    ref = write_claim(root, uid, [result("cpu-numa0", cpus=2)])
    prepared = driver.prepare([ref])[ref.uid]
    assert prepared.claim is not None, prepared.error
    return ref


def _host_file(driver: Driver, ref: ClaimRef) -> Path:
    return driver.reconciler.metadata.host_file(ref.uid, "cpus")


def test_a_prepare_writes_the_claims_metadata_with_its_spec_and_answers_both_ids(tmp_path: Path) -> None:
    driver = _started(tmp_path)
    ref = write_claim(tmp_path, "uid-a", [result("cpu-numa0", cpus=2)])
    prepared = driver.prepare([ref])[ref.uid]
    assert prepared.cdi_ids == ((f"{DRIVER}/cpu=claim-uid-a", f"{DRIVER}/metadata=uid-a_cpus"),)
    assert _host_file(driver, ref).is_file() and driver.reconciler.cdi.path(ref.uid).is_file()
    saved = driver.reconciler.checkpoint.load()
    assert saved is not None and saved.ledger.claims[ref.uid].metadata is not None


def test_an_unprepare_that_cannot_remove_the_metadata_leaves_the_claim_prepared_whole(tmp_path: Path) -> None:
    driver = _started(tmp_path)
    ref = _prepared(driver, tmp_path, "uid-a")
    files = driver.reconciler
    working = files.metadata
    files.metadata = UnremovableMetadata(working.plugin_dir, working.cdi_root, working.driver)

    error = driver.unprepare([ref])[ref.uid]
    assert "read-only file system" in error
    assert ref.uid in driver.snapshot().ledger.claims, "its CPUs are still held"
    saved = files.checkpoint.load()
    assert saved is not None and ref.uid in saved.ledger.claims
    assert files.cdi.path(ref.uid).is_file(), "its spec, removed first, is put back"
    assert _host_file(driver, ref).is_file()

    files.metadata = working
    assert driver.unprepare([ref]) == {ref.uid: ""}
    assert driver.snapshot().ledger.claims == {}
    assert not files.cdi.path(ref.uid).exists() and not _host_file(driver, ref).exists()


def _as_version_1(path: Path) -> None:
    """The checkpoint as a version 1 driver wrote it: no metadata names in the claims."""
    doc = json.loads(path.read_bytes())
    for claim in doc["claims"]:
        del claim["metadata"]
    canonical = "[" + ",".join(json.dumps(c, sort_keys=True, separators=(",", ":")) for c in doc["claims"]) + "]"
    doc["version"], doc["checksum"] = 1, "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(doc))


def test_start_up_adopts_the_metadata_files_a_version_1_driver_wrote(tmp_path: Path) -> None:
    driver = _started(tmp_path)
    ref = _prepared(driver, tmp_path, "uid-a")
    written = _host_file(driver, ref).read_bytes()
    metadata = driver.snapshot().ledger.claims[ref.uid].metadata
    _as_version_1(tmp_path / "state/checkpoint.json")
    driver.reconciler.metadata.spec_path(ref.uid, "cpus").unlink()  # a reboot emptied the CDI folder

    upgraded = make_driver(tmp_path, "dual-socket-smt2")
    upgraded.start()
    assert upgraded.snapshot().ledger.claims[ref.uid].metadata == metadata
    assert _host_file(upgraded, ref).read_bytes() == written
    assert upgraded.reconciler.metadata.spec_path(ref.uid, "cpus").is_file()
    saved = upgraded.reconciler.checkpoint.load()
    assert saved is not None and saved.version == VERSION and saved.ledger.claims[ref.uid].metadata == metadata


def test_a_claim_rebuilt_from_its_cdi_spec_keeps_its_metadata_file_and_is_named_by_the_next_prepare(
    tmp_path: Path,
) -> None:
    driver = _started(tmp_path)
    ref = _prepared(driver, tmp_path, "uid-a")
    written = _host_file(driver, ref).read_bytes()
    (tmp_path / "state/checkpoint.json").write_bytes(b"{")

    rebuilt = make_driver(tmp_path, "dual-socket-smt2")
    rebuilt.start()
    claim = rebuilt.snapshot().ledger.claims[ref.uid]
    assert not claim.named and claim.metadata is not None
    assert _host_file(rebuilt, ref).read_bytes() == written, "kept as found: its devices are not known yet"
    again = rebuilt.prepare([ref])[ref.uid]
    assert again.claim is not None and again.claim.named
    assert again.cdi_ids == ((f"{DRIVER}/cpu=claim-uid-a", f"{DRIVER}/metadata=uid-a_cpus"),)
    assert _host_file(rebuilt, ref).read_bytes() == written


def test_a_claim_whose_pods_change_gets_its_spec_rewritten_and_the_pins_follow(tmp_path: Path) -> None:
    """What a reservedFor change (issue 21) needs: a new ledger entry for a prepared claim, one reconcile."""
    driver = _started(tmp_path)
    ref = _prepared(driver, tmp_path, "uid-a")
    enforcer = RecordingEnforcer()
    driver.enforce_with(enforcer)
    now = driver.snapshot()
    claim = now.ledger.claims[ref.uid]
    moved = now.ledger.with_claim(replace(claim, pod_uids=("pod-2",)))

    log = operation(logging.getLogger("test"), "pods", claimUID=ref.uid)
    driver.reconciler.reconcile(now.ledger, moved, now.view, ref, log)
    env = json.loads(driver.reconciler.cdi.path(ref.uid).read_text())["devices"][0]["containerEdits"]["env"]
    assert f"DRA_PODS_{ref.uid}=pod-2" in env
    saved = driver.reconciler.checkpoint.load()
    assert saved is not None and saved.ledger.claims[ref.uid].pod_uids == ("pod-2",)
    assert [p.ledger for p in enforcer.pools] == [now.ledger, moved]
