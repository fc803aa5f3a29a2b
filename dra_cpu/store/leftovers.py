"""Temp files left by writes killed between create and rename (store/fileio.write_atomic), removed at start-up.

write_atomic names its temp file `.<target name>.<8 random characters>.tmp` (as tempfile.mkstemp did in earlier
versions); only names of that shape whose target matches the caller's pattern are removed, so nothing of another
program is touched.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

# The random part: 8 characters of [a-z0-9_] (mkstemp's alphabet; write_atomic uses hex digits).
_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def temp_target(name: str) -> str | None:
    """The file a write_atomic temp file was for, or None when `name` is not one."""
    match = _TEMP.match(name)
    return match.group("target") if match else None


def remove_temp_files(directory: Path, target_pattern: str) -> list[Path]:
    """Remove `directory`'s write_atomic temp files whose target matches the glob `target_pattern`."""
    removed = []
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        target = temp_target(entry.name)
        if target is not None and fnmatch.fnmatchcase(target, target_pattern) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
