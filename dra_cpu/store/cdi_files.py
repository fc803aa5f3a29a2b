"""The driver's CDI spec files: written atomically, listed, read back and removed (core/cdi_spec.py builds them)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dra_cpu.core.cdi_spec import CDI_CLASS, CDIError, spec_filename
from dra_cpu.store.fileio import read_file, remove_file, write_atomic
from dra_cpu.store.leftovers import remove_temp_files

# A missing CDI folder is made as mkdir(1) makes one: 0o777 less the umask.
FOLDER_MODE = 0o777


@dataclass(frozen=True)
class CDIStore:
    """The driver's spec files in the CDI folder; files of other drivers there are never touched."""

    root: Path
    driver: str

    def path(self, uid: str) -> Path:
        return Path(self._file(uid))

    def _file(self, uid: str) -> str:
        # Text: made on every prepare and unprepare (fileio.write_atomic says why).
        return f"{self.root}/{spec_filename(self.driver, uid)}"

    def write(self, uid: str, spec: Mapping[str, Any]) -> None:
        self._write(uid, _encode(spec))

    def ensure(self, uid: str, spec: Mapping[str, Any], fresh: bool = False) -> None:
        """Write `spec` unless the file holds it already: a retry then succeeds on a full or read-only folder.
        Compared as bytes: the spec is encoded once, and a file holding anything else is rewritten. `fresh`: the
        claim is new to the ledger, and the spec is written without reading what is there first. Whatever an
        earlier attempt left, rolled back or cut short by a crash, is replaced all the same, and a claim new to
        the ledger is no retry that the comparison could let succeed: that takes a prepared claim."""
        data = _encode(spec)
        if not fresh:
            try:
                if read_file(self._file(uid)) == data:
                    return
            except OSError:
                pass  # missing or unreadable: written below
        self._write(uid, data)

    def _write(self, uid: str, data: bytes) -> None:
        try:
            # Not durable: the specs live on a tmpfs, and start-up rewrites them from the checkpoint.
            write_atomic(self._file(uid), data, durable=False, folder_mode=FOLDER_MODE)
        except OSError as err:
            raise CDIError(f"cannot write CDI spec {self._file(uid)}: {err.strerror}") from None

    def remove(self, uid: str) -> None:
        try:
            remove_file(self._file(uid))
        except OSError as err:
            raise CDIError(f"cannot remove CDI spec {self._file(uid)}: {err.strerror}") from None

    def remove_leftovers(self) -> list[Path]:
        """Temp files of spec writes killed before their rename (`.<our spec file name>.<random>.tmp`); other
        drivers' files are never touched."""
        return remove_temp_files(self.root, f"{self.driver}-{CDI_CLASS}_claim-*.json")

    def uids(self) -> Iterator[str]:
        prefix, suffix = f"{self.driver}-{CDI_CLASS}_claim-", ".json"
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(prefix) and entry.name.endswith(suffix):
                yield entry.name[len(prefix) : -len(suffix)]

    def read(self, uid: str) -> dict[str, Any]:
        try:
            spec: dict[str, Any] = json.loads(self.path(uid).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CDIError(f"cannot read CDI spec {self.path(uid)}: {err}") from None
        return spec


def _encode(spec: Mapping[str, Any]) -> bytes:
    # On one line: the json module indents in Python, ten times slower than its C encoder, on every prepare.
    return json.dumps(spec).encode() + b"\n"
