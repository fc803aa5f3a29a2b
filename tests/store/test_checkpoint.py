"""The checkpoint survives restarts, reboots and corruption without losing or inventing an allocation."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import HugePageGrant, Ledger, PreparedClaim, PreparedDevice
from dra_cpu.driver import Driver, PreparedResult
from dra_cpu.store.checkpoint import VERSION, Checkpoint, CheckpointError, CheckpointFile, decode, encode
from tests.harness.claims import result
from tests.harness.nodes.standin import make_driver, write_claim


def _ledger() -> Ledger:
    claim = PreparedClaim(
        ref=ClaimRef("ns", "a", "uid-a"),
        devices=(
            PreparedDevice(("cpus",), "node-a", "cpu-numa0", "share-1", CPUSet.parse("2-3")),
            PreparedDevice(("mem",), "node-a", "hugepages-2mi-numa0", None, hugepages=HugePageGrant(0, 2048, 4 << 20)),
        ),
        pod_uids=("pod-1",),
    )
    return Ledger({claim.uid: claim})


def test_round_trip() -> None:
    checkpoint = Checkpoint(_ledger(), "boot-1")
    assert decode(encode(checkpoint), "x") == checkpoint


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[: len(b) // 2], "not JSON"),
        (lambda b: b.replace(b'"2-3"', b'"2-4"'), "checksum mismatch"),
        (lambda b: b.replace(b'"version": %d' % VERSION, b'"version": 9'), "version 9, expected 1, 2"),
        (lambda b: b"\xff\xfe", "not JSON"),
    ],
)
def test_tampering_is_detected(mangle: Callable[[bytes], bytes], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        decode(mangle(encode(Checkpoint(_ledger(), "b"))), "file")


def _prepare_one(driver: Driver, root: Path, uid: str, results: list[dict[str, Any]]) -> PreparedResult:
    return driver.prepare([write_claim(root, uid, results)])[uid]


def _prepare(root: Path, uid: str, cpus: int) -> CPUSet:
    driver = make_driver(root, "dual-socket-smt2")
    driver.start()
    res = _prepare_one(driver, root, uid, [result("cpu-numa0", cpus=cpus)])
    assert res.claim is not None, res.error
    return res.claim.cpus


@pytest.mark.parametrize("corrupt", [False, True], ids=["checkpoint", "rebuilt-from-cdi"])
def test_hugepage_accounting_survives_restart(tmp_path: Path, corrupt: bool) -> None:
    """Before: nothing counted hugepages, so after a restart (or a rebuild from CDI specs) a 2Mi claim on a full
    128Mi device was prepared."""
    (tmp_path / "state").mkdir()
    driver = make_driver(tmp_path, "dual-socket-smt2")
    driver.start()
    for uid in ("a", "b"):
        res = _prepare_one(driver, tmp_path, uid, [result("hugepages-2mi-numa0", request="mem", memory="64Mi")])
        assert res.claim is not None, res.error
    if corrupt:
        (tmp_path / "state/checkpoint.json").write_bytes(b"{")
    again = make_driver(tmp_path, "dual-socket-smt2")
    again.start()
    assert again.snapshot().ledger.allocated_hugepages == {(0, 2048): 128 << 20}
    more = _prepare_one(again, tmp_path, "c", [result("hugepages-2mi-numa0", request="mem", memory="2Mi")])
    assert more.error.endswith("2Mi of hugepages requested, none of 128Mi free")
    repeat = again.prepare([ClaimRef("default", "a", "a")])["a"]
    assert repeat.claim is not None and repeat.claim.hugepages == (HugePageGrant(0, 2048, 64 << 20),)


def test_corrupt_checkpoint_is_rebuilt_from_cdi_specs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state").mkdir()
    a, b = _prepare(tmp_path, "uid-a", 2), _prepare(tmp_path, "uid-b", 3)
    checkpoint = tmp_path / "state/checkpoint.json"
    checkpoint.write_bytes(checkpoint.read_bytes()[:40])
    driver = make_driver(tmp_path, "dual-socket-smt2")
    with caplog.at_level(logging.ERROR):
        driver.start()
    assert "checkpoint is corrupt" in caplog.text
    assert {u: c.cpus for u, c in driver.snapshot().ledger.claims.items()} == {"uid-a": a, "uid-b": b}
    assert driver.snapshot().ledger.claims["uid-a"].ref == ClaimRef("default", "uid-a", "uid-a")
    assert list((tmp_path / "state").glob("checkpoint.json.corrupt-*")), "the bad file is kept for a person"
    reloaded = CheckpointFile(tmp_path / "state").load()
    assert reloaded is not None and set(reloaded.ledger.claims) == {"uid-a", "uid-b"}
    # A kubelet retry of the prepare gets the same CPUs and the full device record back, and it is kept.
    again = driver.prepare([ClaimRef("default", "uid-a", "uid-a")])["uid-a"]
    assert again.claim is not None and again.claim.cpus == a
    assert [(d.device, d.pool, d.request_names) for d in again.claim.devices] == [("cpu-numa0", "node-a", ("cpus",))]
    saved = CheckpointFile(tmp_path / "state").load()
    assert saved is not None and saved.ledger.claims["uid-a"].devices[0].device == "cpu-numa0"


def test_reboot_rewrites_cdi_specs(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    cpus = _prepare(tmp_path, "uid-a", 2)
    shutil.rmtree(tmp_path / "cdi")  # /var/run is a tmpfs: gone after a reboot
    data = json.loads((tmp_path / "state/checkpoint.json").read_text())
    assert data["bootID"] == "boot-1"
    driver = make_driver(tmp_path, "dual-socket-smt2")
    driver.reconciler.boot_id = "boot-2"
    driver.start()
    spec = json.loads(driver.reconciler.cdi.path("uid-a").read_text())
    assert f"DRA_CPUSET_uid-a={cpus}" in spec["devices"][0]["containerEdits"]["env"]
    assert json.loads((tmp_path / "state/checkpoint.json").read_text())["bootID"] == "boot-2"


def test_orphaned_spec_is_removed_and_other_drivers_specs_kept(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    _prepare(tmp_path, "uid-a", 1)
    orphan = tmp_path / "cdi/dra.cpu-cpu_claim-ghost.json"
    other = tmp_path / "cdi/gpu.example.com-gpu_claim-x.json"
    orphan.write_text("{}")
    other.write_text("{}")
    driver = make_driver(tmp_path, "dual-socket-smt2")
    driver.start()
    assert not orphan.exists() and other.exists()
    assert set(driver.snapshot().ledger.claims) == {"uid-a"}


def test_leftover_temp_files_of_ours_are_removed_at_start(tmp_path: Path) -> None:
    """Before: temp files of writes killed before their rename piled up in the state and CDI folders forever."""
    (tmp_path / "state").mkdir()
    _prepare(tmp_path, "uid-a", 1)
    ours = [
        tmp_path / "state/.checkpoint.json.k2j4_x9q.tmp",
        tmp_path / "cdi/.dra.cpu-cpu_claim-uid-b.json.a1b2c3d4.tmp",
    ]
    theirs = [
        tmp_path / "state/notes.tmp",
        tmp_path / "state/.checkpoint.json.tmp",
        tmp_path / "cdi/.gpu.example.com-gpu_claim-x.json.a1b2c3d4.tmp",
        tmp_path / "cdi/.dra.cpu-cpu_claim-uid-b.json.too-long-part.tmp",
    ]
    for path in [*ours, *theirs]:
        path.write_text("{")
    driver = make_driver(tmp_path, "dual-socket-smt2")
    driver.start()
    assert [p.name for p in ours if p.exists()] == []
    assert [p.name for p in theirs if not p.exists()] == []
    assert set(driver.snapshot().ledger.claims) == {"uid-a"}


def test_state_folder_is_0700_and_checkpoint_0600(tmp_path: Path) -> None:
    """Before: the state folder stayed as created (0755), readable by every user of the node."""
    (tmp_path / "state").mkdir(mode=0o755)
    _prepare(tmp_path, "uid-a", 1)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state/checkpoint.json").stat().st_mode & 0o777 == 0o600


def _ledgers(count: int) -> list[Ledger]:
    claims = [
        PreparedClaim(
            ClaimRef("ns", f"c{i}", f"uid-{i}"), (PreparedDevice(("cpus",), "n", "cpu-numa0", None, CPUSet.of([i])),)
        )
        for i in range(count)
    ]
    return [Ledger({c.uid: c for c in claims[: n + 1]}) for n in range(count)]


def _inode(path: Path) -> int:
    return path.stat().st_ino


def test_saves_after_the_first_reuse_the_spare_file(tmp_path: Path) -> None:
    """Before: every save made a new temp file, whose inode cost more than the rest of the save on some disks."""
    checkpoint = CheckpointFile(tmp_path / "state")
    checkpoint.secure()
    states = _ledgers(5)
    checkpoint.save(Checkpoint(states[0], "b"))
    checkpoint.save(Checkpoint(states[1], "b"))
    inodes = {_inode(checkpoint.path), _inode(checkpoint.spare)}
    for state in states[2:]:
        checkpoint.save(Checkpoint(state, "b"))
        assert {_inode(checkpoint.path), _inode(checkpoint.spare)} == inodes
        loaded = CheckpointFile(tmp_path / "state").load()
        assert loaded is not None and loaded.ledger == state
    # The spare holds the save before the last (the exchange), complete, in the checkpoint's mode.
    assert decode(checkpoint.spare.read_bytes(), "spare").ledger == states[-2]
    assert {p.name for p in (tmp_path / "state").iterdir()} == {"checkpoint.json", ".checkpoint.json.spare"}
    assert checkpoint.path.stat().st_mode & 0o777 == checkpoint.spare.stat().st_mode & 0o777 == 0o600


def test_a_new_process_leaves_the_spare_alone_until_its_first_save_is_done(tmp_path: Path) -> None:
    """An exchange of a killed process may not be on disk yet: the spare may still be what checkpoint.json names
    after a power loss, so the first save of a process makes a new file."""
    first = CheckpointFile(tmp_path / "state")
    first.secure()
    states = _ledgers(3)
    for state in states[:2]:
        first.save(Checkpoint(state, "b"))
    spare = first.spare.read_bytes()
    second = CheckpointFile(tmp_path / "state")
    second.save(Checkpoint(states[2], "b"))
    assert first.spare.read_bytes() == spare
    loaded = second.load()
    assert loaded is not None and loaded.ledger == states[2]


def test_saves_without_the_exchange_still_replace_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr("dra_cpu.store.checkpoint.exchange", unsupported)
    checkpoint = CheckpointFile(tmp_path / "state")
    checkpoint.secure()
    for state in _ledgers(4):
        checkpoint.save(Checkpoint(state, "b"))
        loaded = CheckpointFile(tmp_path / "state").load()
        assert loaded is not None and loaded.ledger == state
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["checkpoint.json"]


def test_a_failed_exchange_fails_the_save_and_the_next_one_makes_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = CheckpointFile(tmp_path / "state")
    checkpoint.secure()
    states = _ledgers(3)
    checkpoint.save(Checkpoint(states[0], "b"))

    def broken(a: Path, b: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("dra_cpu.store.checkpoint.exchange", broken)
    with pytest.raises(OSError, match="Input/output error"):
        checkpoint.save(Checkpoint(states[1], "b"))
    loaded = checkpoint.load()
    assert loaded is not None and loaded.ledger == states[0]
    checkpoint.save(Checkpoint(states[2], "b"))  # by a temp file: the exchange is not tried
    loaded = checkpoint.load()
    assert loaded is not None and loaded.ledger == states[2]
