"""`discover --watch` sees CPU hotplug on the live machine (root only; CPU 1 is always put back online)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dra_cpu.core.cpuset import CPUSet

CPU1_ONLINE = Path("/sys/devices/system/cpu/cpu1/online")


def _can_hotplug() -> str | None:
    if os.geteuid() != 0:
        return "needs root to offline a CPU"
    if not CPU1_ONLINE.exists():
        return "this kernel cannot offline CPU 1"
    if CPU1_ONLINE.read_text().strip() != "1":
        return "CPU 1 is offline already"
    return None


V1_CPUSET = Path("/sys/fs/cgroup/cpuset")


@pytest.fixture
def cpu1_restored() -> Iterator[None]:
    """CPU 1 back online, and on cgroup v1 back in every cpuset it was in: v1 drops an offlined CPU from all
    cpusets for good, which would leave other tests' (and the machine's) cgroups a CPU short."""
    before = {p: p.read_text() for p in V1_CPUSET.rglob("cpuset.cpus")} if V1_CPUSET.is_dir() else {}
    try:
        yield
    finally:
        CPU1_ONLINE.write_text("1")
        # Parents first: a child may only hold CPUs its parent has.
        for path, cpus in sorted(before.items(), key=lambda item: len(item[0].parts)):
            with contextlib.suppress(OSError):
                if path.read_text() != cpus:
                    path.write_text(cpus)


def _snapshots(proc: subprocess.Popen[str]) -> queue.Queue[dict[str, Any]]:
    out: queue.Queue[dict[str, Any]] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in proc.stdout:
            buffer += line
            try:
                obj, end = decoder.raw_decode(buffer.strip())
            except json.JSONDecodeError:
                continue
            out.put(obj)
            buffer = buffer.strip()[end:]

    threading.Thread(target=pump, daemon=True).start()
    return out


# Generous: CI machines are busy, and the first snapshot waits for the CLI's imports.
DEADLINE_S = 60


def _wait_for(snapshots: queue.Queue[dict[str, Any]], online: bool) -> dict[str, Any]:
    """The first snapshot with CPU 1 in the wanted state; others may come between (hugepages, caches reappearing)."""
    deadline = time.monotonic() + DEADLINE_S
    seen = 0
    while True:
        try:
            snapshot = snapshots.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"no snapshot with CPU 1 online={online} within {DEADLINE_S} s ({seen} other snapshot(s) came)"
            ) from None
        if snapshot["cpus"][1]["online"] is online:
            return snapshot
        seen += 1


@pytest.mark.root
@pytest.mark.skipif(_can_hotplug() is not None, reason=str(_can_hotplug()))
def test_watch_reports_offline_and_online(cpu1_restored: None) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dra_cpu", "discover", "--watch", "--output", "json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        snapshots = _snapshots(proc)
        try:
            first = snapshots.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"`dra-cpu discover --watch` printed no snapshot within {DEADLINE_S} s") from None
        assert first["cpus"][1]["online"] is True
        time.sleep(0.5)  # the netlink monitor is listening once the first snapshot is out
        CPU1_ONLINE.write_text("0")
        offline = _wait_for(snapshots, online=False)
        assert offline["cpus"][1]["core"] is None
        assert 1 not in CPUSet.parse(offline["summary"]["online"])
        CPU1_ONLINE.write_text("1")
        online = _wait_for(snapshots, online=True)
        assert online["cpus"][1]["core"] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
