"""write_atomic makes a missing folder only when asked to, and leaves nothing behind when it may not."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dra_cpu.store.fileio import write_atomic


def test_a_missing_folder_is_made_with_its_parents_when_a_mode_is_given(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "spec.json"
    old = os.umask(0o022)
    try:
        write_atomic(target, b"{}\n", durable=False, folder_mode=0o750)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"{}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [stat.S_IMODE((tmp_path / p).stat().st_mode) for p in ("a", "a/b")] == [0o750, 0o750]
    assert sorted(p.name for p in target.parent.iterdir()) == ["spec.json"], "no temp file is left"


def test_without_a_folder_mode_a_missing_folder_is_an_error_and_nothing_is_made(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "checkpoint.json", b"{}", durable=False)
    assert list(tmp_path.iterdir()) == []
