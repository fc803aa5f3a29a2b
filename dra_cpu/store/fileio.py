"""Atomic file replacement: the one way dra-cpu writes state that must survive a crash at any instant."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.errors import DraCpuError, not_utf8

# libyaml's parser is some 10 times faster than the pure-Python one.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Temp file in the same folder, rename over `path`: readers see the old or the new content, never half of it.

    `durable` adds the fsyncs that make the new content survive a power loss; files on a tmpfs, or rebuilt from a
    durable source at start-up (CDI specs from the checkpoint), skip them: they cost most of a prepare's time.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fdatasync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def boot_id(proc: Path = Path("/proc")) -> str:
    """Changes on every reboot: CDI specs under /var/run are gone then and must be written again."""
    return (proc / "sys/kernel/random/boot_id").read_text().strip()


def read_yaml(path: Path, what: str, error: type[DraCpuError] = DraCpuError) -> list[Any]:
    """Every document of a YAML (or JSON) file a person gave us; a failure is one line naming `what` and the path."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{what} {path}: no such file") from None
    except OSError as err:
        raise error(f"{what} {path}: cannot read it: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text: {not_utf8(err)}") from None
    try:
        return [doc for doc in yaml.load_all(text, Loader=YAML_LOADER) if doc is not None]
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except ValueError as err:  # a constructor's: an integer of 5000 digits, a timestamp in month 13
        raise error(f"{what} {path} holds a value YAML cannot build: {' '.join(str(err).split())}") from None
