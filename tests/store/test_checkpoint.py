"""The checkpoint survives restarts, reboots and corruption without losing or inventing an allocation."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import HugePageGrant, Ledger, PreparedClaim, PreparedDevice
from dra_cpu.driver import Driver, PreparedResult
from dra_cpu.store.checkpoint import (
    FILENAME,
    SPARE,
    VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointFile,
    decode,
    encode,
)
from dra_cpu.store.fileio import exchange
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


def _flushes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each save flushes to the disk: 'data' (fdatasync) and 'folder' (fsync of the state folder)."""
    calls: list[str] = []

    def counted(name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def flush(fd: int) -> None:
            calls.append(name)
            real(fd)

        return flush

    monkeypatch.setattr(os, "fdatasync", counted("data", os.fdatasync))
    monkeypatch.setattr(os, "fsync", counted("folder", os.fsync))
    return calls


def test_a_save_after_the_first_flushes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: each save flushed the content and then the folder, two flushes where one durable write needs one."""
    checkpoint = CheckpointFile(tmp_path / "state")
    checkpoint.secure()
    flushes = _flushes(monkeypatch)
    states = _ledgers(4)
    checkpoint.save(Checkpoint(states[0], "b"))
    assert flushes == ["data", "folder"]  # a new file: temp file and rename
    flushes.clear()
    checkpoint.save(Checkpoint(states[1], "b"))
    assert flushes == ["data", "folder"]  # the spare is made: its name must last
    for state in states[2:]:
        flushes.clear()
        checkpoint.save(Checkpoint(state, "b"))
        assert flushes == ["data"]
    loaded = checkpoint.load()
    assert loaded is not None and (loaded.ledger, loaded.sequence) == (states[-1], 4)


def test_the_newer_save_wins_when_a_power_loss_reverted_the_swap(tmp_path: Path) -> None:
    """The swap after a save is not flushed: after a power loss the names may be those from before it, so that the
    spare holds the newest save. Load takes it, and the next process's saves go on above it."""
    checkpoint = CheckpointFile(tmp_path / "state")
    checkpoint.secure()
    states = _ledgers(4)
    for state in states[:3]:
        checkpoint.save(Checkpoint(state, "b"))
    exchange(checkpoint.spare, checkpoint.path)  # the names as the disk may still have them
    assert decode(checkpoint.path.read_bytes(), "x").ledger == states[1]
    after = CheckpointFile(tmp_path / "state")
    loaded = after.load()
    assert loaded is not None and (loaded.ledger, loaded.sequence) == (states[2], 3)
    after.save(Checkpoint(states[3], "b"))
    loaded = CheckpointFile(tmp_path / "state").load()
    assert loaded is not None and (loaded.ledger, loaded.sequence) == (states[3], 4)
    assert decode(after.path.read_bytes(), "x").ledger == states[3]


def test_a_failed_write_of_the_spare_leaves_the_save_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = CheckpointFile(tmp_path / "state")
    checkpoint.secure()
    states = _ledgers(3)
    checkpoint.save(Checkpoint(states[0], "b"))
    checkpoint.save(Checkpoint(states[1], "b"))

    def full(path: Path, data: bytes, mode: int) -> None:
        path.write_bytes(data)  # all of it written, and then the flush fails
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("dra_cpu.store.checkpoint.write_in_place", full)
    with pytest.raises(OSError, match="Input/output error"):
        checkpoint.save(Checkpoint(states[2], "b"))
    loaded = CheckpointFile(tmp_path / "state").load()
    assert loaded is not None and loaded.ledger == states[1]


def test_a_checkpoint_of_a_driver_before_sequence_numbers_loads(tmp_path: Path) -> None:
    """Its spare (the save before) has no sequence number either: checkpoint.json, the newest, is taken."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    states = _ledgers(2)
    for name, state in ((SPARE, states[0]), (FILENAME, states[1])):
        (state_dir / name).write_bytes(encode(Checkpoint(state, "b")))  # no sequence number
    checkpoint = CheckpointFile(state_dir)
    loaded = checkpoint.load()
    assert loaded is not None and (loaded.ledger, loaded.sequence) == (states[1], 0)
    checkpoint.save(Checkpoint(states[0], "b"))
    loaded = CheckpointFile(state_dir).load()
    assert loaded is not None and (loaded.ledger, loaded.sequence) == (states[0], 1)


def _saved(directory: Path, count: int) -> tuple[CheckpointFile, list[Ledger]]:
    """`count` saves of one process, each one claim more, in a fresh state folder."""
    checkpoint = CheckpointFile(directory)
    checkpoint.secure()
    ledgers = _ledgers(count)
    for ledger in ledgers:
        checkpoint.save(Checkpoint(ledger, "boot-1"))
    return checkpoint, ledgers


def _tear(path: Path) -> None:
    """A save's write into `path` cut short by a power loss: the first bytes of another save over the old ones."""
    data = path.read_bytes()
    path.write_bytes(f'{{"version": {VERSION}, "bootID": "boot-1", "che'.encode() + data[40:])


# What the disk may hold after a power loss at any instant of the fourth save of one process (saves 1-3 told to the
# caller): the names as the last swaps left them, flushed or not, and the fourth save's write into the file that
# holds the older save, not begun, cut short or done. `reverted`: the third save's swap is not on the disk;
# `fourth`: what the fourth save's write left in that file. Each time the reader must take the third save or newer.
@pytest.mark.parametrize("reverted", [False, True], ids=["swap-flushed", "swap-reverted"])
@pytest.mark.parametrize("fourth", ["none", "torn", "done"])
def test_the_reader_takes_the_newest_complete_save_after_a_power_loss(
    tmp_path: Path, reverted: bool, fourth: str
) -> None:
    state = tmp_path / "state"
    checkpoint, ledgers = _saved(state, 3)
    older = checkpoint.spare  # the file the fourth save writes into, by the names this process knows
    if fourth == "torn":
        _tear(older)
    elif fourth == "done":
        older.write_bytes(encode(Checkpoint(_ledgers(4)[3], "boot-1"), sequence=4))
    if reverted:
        exchange(checkpoint.spare, checkpoint.path)
    expected = {"none": (ledgers[2], 3), "torn": (ledgers[2], 3), "done": (_ledgers(4)[3], 4)}[fourth]
    try:
        loaded = CheckpointFile(state).load()
    except CheckpointError as err:
        # Only checkpoint.json torn: possible only by names a power loss reverted, and then the spare is the save.
        assert (reverted, fourth) == (True, "torn")
        assert err.spare is not None and (err.spare.ledger, err.spare.sequence) == expected
        assert err.spare.boot_id == "boot-1"
        return
    assert loaded is not None and (loaded.ledger, loaded.sequence) == expected
    # The next process goes on above it, whatever the names were.
    after = CheckpointFile(state)
    after.save(Checkpoint(Ledger(), "boot-2"))
    assert decode(after.path.read_bytes(), "x").sequence == expected[1] + 1


def test_a_checkpoint_torn_by_a_power_loss_gives_way_to_the_spare_after_the_reboot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A prepare told to the kubelet survives a power loss at any instant after: the save of the next prepare tore
    checkpoint.json because the power loss undid the swap that had made it the spare. After the reboot (CDI specs
    gone with /var/run) the driver loads the spare, which holds every claim the kubelet was told of."""
    (tmp_path / "state").mkdir()
    driver = make_driver(tmp_path, "dual-socket-smt2")
    driver.start()
    granted = {}
    for uid in ("uid-a", "uid-b", "uid-c"):
        ref = write_claim(tmp_path, uid, [result("cpu-numa0", cpus=2)])
        claim = driver.prepare([ref])[uid].claim
        assert claim is not None
        granted[uid] = claim.cpus
    checkpoint = CheckpointFile(tmp_path / "state")
    exchange(checkpoint.spare, checkpoint.path)  # the last swap never reached the disk
    _tear(checkpoint.path)  # the next prepare's save was writing into that file
    shutil.rmtree(tmp_path / "cdi")
    rebooted = make_driver(tmp_path, "dual-socket-smt2")
    rebooted.reconciler.boot_id = "boot-2"
    with caplog.at_level(logging.ERROR):
        rebooted.start()
    assert "loading the save its spare holds" in caplog.text
    assert {u: c.cpus for u, c in rebooted.snapshot().ledger.claims.items()} == granted
    assert list((tmp_path / "state").glob("checkpoint.json.corrupt-*")), "the torn file is kept for a person"
    assert {f"dra.cpu-cpu_claim-{u}.json" for u in granted} <= {p.name for p in (tmp_path / "cdi").iterdir()}


def test_a_checkpoint_torn_within_one_boot_is_rebuilt_from_the_cdi_specs_not_the_spare(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing of ours tears checkpoint.json within a boot (someone else did): the spare is a save behind the CDI
    specs, which hold every claim."""
    (tmp_path / "state").mkdir()
    driver = make_driver(tmp_path, "dual-socket-smt2")
    driver.start()
    for uid in ("uid-a", "uid-b"):
        ref = write_claim(tmp_path, uid, [result("cpu-numa0", cpus=2)])
        assert driver.prepare([ref])[uid].claim is not None
    checkpoint = CheckpointFile(tmp_path / "state")
    assert set(decode(checkpoint.spare.read_bytes(), "spare").ledger.claims) == {"uid-a"}
    _tear(checkpoint.path)
    again = make_driver(tmp_path, "dual-socket-smt2")
    with caplog.at_level(logging.ERROR):
        again.start()
    assert "rebuilding the prepared claims from CDI specs" in caplog.text
    assert set(again.snapshot().ledger.claims) == {"uid-a", "uid-b"}


def test_a_file_of_an_unknown_version_offers_no_spare(tmp_path: Path) -> None:
    """Not torn: written by a newer driver, whose spare is a save behind it."""
    checkpoint, _ = _saved(tmp_path / "state", 2)
    written = checkpoint.path.read_bytes()
    assert f'"version": {VERSION}'.encode() in written
    checkpoint.path.write_bytes(written.replace(f'"version": {VERSION}'.encode(), b'"version": 9'))
    with pytest.raises(CheckpointError, match="version 9") as raised:
        CheckpointFile(tmp_path / "state").load()
    assert raised.value.spare is None
