"""Every checkpoint version ever written still loads, as the claims its writer saved (tests/fixtures/checkpoint:
files the writers of each version made, never regenerated); the newest writes exactly its golden files; a file of
a version this driver does not know is not trusted: moved aside, the ledger rebuilt from the CDI specs."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from dra_cpu.core import ledger
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import ClaimMetadata, HugePageGrant, Ledger, PreparedClaim, PreparedDevice, Unrestorable
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.store import checkpoint_v1
from dra_cpu.store.checkpoint import READERS, VERSION, Checkpoint, CheckpointError, CheckpointFile, decode, encode
from tests.harness.claims import result
from tests.harness.nodes.standin import make_driver, write_claim
from tests.harness.paths import FIXTURES

GOLDEN = FIXTURES / "checkpoint"
BOOT = "2b7e1516-28ae-4d2a-a6d2-abf7158809cf"
PINNED = PreparedClaim(
    ref=ClaimRef("default", "pinned", "4f2a8c1e-0b7d-4e3a-9c55-1d2e3f405162"),
    devices=(
        PreparedDevice(("cpus",), "node-a", "cpu-numa0", None, CPUSet.parse("2-3,10-11")),
        PreparedDevice(("mem",), "node-a", "hugepages-2mi-numa0", None, hugepages=HugePageGrant(0, 2048, 4 << 20)),
    ),
    pod_uids=("7c1d2e3f-aaaa-4bbb-8ccc-0123456789ab",),
)
SHARED = PreparedClaim(
    ref=ClaimRef("team-b", "shared-cpus", "9e8d7c6b-5a49-4382-a1b0-c9d8e7f6a5b4"),
    devices=(PreparedDevice(("cpus",), "node-a", "cpu-numa1", "share-7", CPUSet.parse("20")),),
    pod_uids=("11111111-2222-4333-8444-555555555555",),
)
# Rebuilt from a CDI spec after a corrupt checkpoint: no device or request names until the kubelet prepares it again.
REBUILT = PreparedClaim(
    ref=ClaimRef("default", "rebuilt", "0a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c3d"),
    devices=(PreparedDevice((), "node-a", "", None, CPUSet.parse("5")),),
)
LOST = Unrestorable(
    ClaimRef("default", "gone", "deadbeef-0000-4000-8000-000000000001"),
    "its CPU(s) 38-41 are not online on this node any more (online: 0-31)",
)
V1_CLAIMS = {c.uid: c for c in (PINNED, SHARED, REBUILT)}
# What version 2 added: the names of each claim's device metadata files (None: it has none).
V2_CLAIMS = {
    PINNED.uid: PreparedClaim(PINNED.ref, PINNED.devices, PINNED.pod_uids, ClaimMetadata(None, ("cpus", "mem"))),
    SHARED.uid: PreparedClaim(SHARED.ref, SHARED.devices, SHARED.pod_uids, ClaimMetadata("pinned", ("cpus/big",))),
    REBUILT.uid: REBUILT,
}
# What version 3 added: memory per device, and the claim's memoryBinding where it is not the default: CPUs, memory
# and pages on node 0 (strict by default); a CPU-only claim opted into strict; memory over two nodes, preferred.
WIDE = PreparedClaim(
    ref=ClaimRef("default", "wide-memory", "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e"),
    devices=(
        PreparedDevice(("cpus",), "node-a", "cpu-numa0", None, CPUSet.parse("4-5")),
        PreparedDevice(("memory",), "node-a", "memory-numa0", "share-8", memory=ledger.MemoryGrant(0, 256 << 20)),
        PreparedDevice(("memory",), "node-a", "memory-numa1", "share-9", memory=ledger.MemoryGrant(1, 256 << 20)),
    ),
    pod_uids=("22222222-3333-4444-8555-666666666666",),
    metadata=ClaimMetadata(None, ("cpus", "memory")),
).with_binding(MemoryBinding.PREFERRED)
V3_CLAIMS = {
    PINNED.uid: PreparedClaim(
        PINNED.ref,
        (
            *PINNED.devices,
            PreparedDevice(("memory",), "node-a", "memory-numa0", "share-3", memory=ledger.MemoryGrant(0, 400 << 20)),
        ),
        PINNED.pod_uids,
        ClaimMetadata(None, ("cpus", "mem", "memory")),
    ),
    SHARED.uid: V2_CLAIMS[SHARED.uid].with_binding(MemoryBinding.STRICT),
    WIDE.uid: WIDE,
    REBUILT.uid: REBUILT,
}
# Each golden file: (version, the ledger its writer saved).
FILES = {
    "v1-first-layout.json": (1, Ledger({PINNED.uid: PINNED})),
    "v1.json": (1, Ledger(V1_CLAIMS)),
    "v1-unrestorable.json": (1, Ledger(V1_CLAIMS, {LOST.uid: LOST})),
    "v1-empty.json": (1, Ledger()),
    "v2.json": (2, Ledger(V2_CLAIMS)),
    "v2-unrestorable.json": (2, Ledger(V2_CLAIMS, {LOST.uid: LOST})),
    "v2-sequence.json": (2, Ledger(V2_CLAIMS)),
    "v3.json": (3, Ledger(V3_CLAIMS)),
    "v3-unrestorable.json": (3, Ledger(V3_CLAIMS, {LOST.uid: LOST})),
}
# The save's number in the header, where the writer wrote one (added to version 2 without a bump: a reader that
# does not know it reads the file right).
SEQUENCES = {"v2-sequence.json": 7}


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_golden_file_loads_as_its_writer_saved_it(name: str) -> None:
    version, ledger = FILES[name]
    assert decode((GOLDEN / name).read_bytes(), name) == Checkpoint(ledger, BOOT, version, SEQUENCES.get(name, 0))


def test_every_version_read_has_golden_files_and_every_golden_file_is_tested() -> None:
    on_disk = {p.name for p in GOLDEN.glob("*.json")}
    assert on_disk == set(FILES)
    assert {int(re.match(r"v(\d+)", name).group(1)) for name in on_disk} == set(READERS)  # type: ignore[union-attr]
    assert max(READERS) == VERSION


@pytest.mark.parametrize("name", [n for n, (v, _) in FILES.items() if v == VERSION])
def test_the_newest_writer_writes_its_golden_files_byte_for_byte(name: str) -> None:
    """Changing what the writer writes is a new version: these bytes are what drivers of this version left."""
    assert encode(Checkpoint(FILES[name][1], BOOT), sequence=SEQUENCES.get(name, 0)) == (GOLDEN / name).read_bytes()


def test_round_trip_of_the_newest_version() -> None:
    ledger = Ledger(V3_CLAIMS, {LOST.uid: LOST})
    assert decode(encode(Checkpoint(ledger, "b")), "x") == Checkpoint(ledger, "b", VERSION)
    assert decode(encode(Checkpoint(Ledger(), "")), "x") == Checkpoint(Ledger(), "", VERSION)


def test_version_1_reads_records_with_and_without_the_optional_fields() -> None:
    """The reader of version 1 takes what every writer of version 1 wrote: a record without podUIDs, shareID or
    hugepages reads as having none."""
    record = {
        "namespace": "ns",
        "name": "c",
        "uid": "u",
        "devices": [{"requestNames": ["cpus"], "pool": "p", "device": "d", "cpus": "1-2"}],
    }
    assert checkpoint_v1.claim(record) == PreparedClaim(
        ClaimRef("ns", "c", "u"), (PreparedDevice(("cpus",), "p", "d", None, CPUSet.parse("1-2")),)
    )


def test_an_upgrade_loads_version_1_and_saves_the_newest(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "checkpoint.json").write_bytes((GOLDEN / "v1-unrestorable.json").read_bytes())
    store = CheckpointFile(state)
    loaded = store.load()
    assert loaded is not None and loaded.version == 1
    store.save(Checkpoint(loaded.ledger, loaded.boot_id))
    again = store.load()
    assert again == Checkpoint(loaded.ledger, BOOT, VERSION, sequence=1)
    assert json.loads((state / "checkpoint.json").read_bytes())["version"] == VERSION


def _newer(data: bytes) -> bytes:
    """A file as a driver of a later version might write it: a number this driver does not know, a field it
    does not either, with a checksum that holds."""
    doc = json.loads(data)
    doc["version"] = VERSION + 1
    for claim in doc["claims"]:
        claim["swap"] = [{"numaNode": 0, "bytes": 1 << 30}]
    canonical = "[" + ",".join(json.dumps(c, sort_keys=True, separators=(",", ":")) for c in doc["claims"]) + "]"
    doc["checksum"] = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(doc).encode()


def test_a_newer_version_is_refused_by_name() -> None:
    with pytest.raises(CheckpointError, match=rf"version {VERSION + 1}, expected 1, 2, 3 \(a newer driver's file\?\)"):
        decode(_newer(encode(Checkpoint(Ledger(V3_CLAIMS), BOOT))), "f")


def test_a_downgrade_moves_the_newer_file_aside_and_rebuilds_from_the_cdi_specs(tmp_path: Path) -> None:
    """What an older driver does with a newer driver's file: it cannot know what the new fields mean, so it trusts
    none of it; the grants come back from the CDI specs (until a reboot empties their folder, when the kubelet
    prepares every claim again anyway), loudly, and the newer file is kept for a person to look at."""
    (tmp_path / "state").mkdir()
    driver = make_driver(tmp_path, "dual-socket-smt2")
    driver.start()
    ref = write_claim(tmp_path, "uid-a", [result("cpu-numa0", cpus=2)])
    granted = driver.prepare([ref])[ref.uid].claim
    assert granted is not None
    path = tmp_path / "state/checkpoint.json"
    path.write_bytes(_newer(path.read_bytes()))

    older = make_driver(tmp_path, "dual-socket-smt2")
    older.start()
    assert {u: c.cpus for u, c in older.snapshot().ledger.claims.items()} == {"uid-a": granted.cpus}
    [aside] = (tmp_path / "state").glob("checkpoint.json.corrupt-*")
    assert json.loads(aside.read_bytes())["version"] == VERSION + 1
    assert json.loads(path.read_bytes())["version"] == VERSION
