"""Atomic file replacement: the one way dra-cpu writes state that must survive a crash at any instant."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.errors import DraCpuError, not_utf8

# libyaml's parser is some 10 times faster than the pure-Python one.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o644,
    durable: bool = True,
    folder_mode: int | None = None,
) -> None:
    """Temp file in the same folder, rename over `path`: readers see the old or the new content, never half of it.

    `durable` adds the fsyncs that make the new content survive a power loss; files on a tmpfs, or rebuilt from a
    durable source at start-up (CDI specs from the checkpoint), skip them: they cost most of a prepare's time.
    With a `folder_mode`, a missing folder is made (make_folders), not durably: for files that are not durable
    either. Made only when missing, so that the common write costs no system call for it. The path is handled as
    text: a prepare writes three files and an unprepare removes them, and each Path made on the way (a folder, a
    file name) costs a few microseconds, as much as some of the system calls.
    """
    folder, name = os.path.split(os.fspath(path))
    folder = folder or "."
    try:
        fd, tmp = _temp_file(folder, name)
    except FileNotFoundError:
        if folder_mode is None:
            raise
        make_folders(Path(folder), folder_mode)
        fd, tmp = _temp_file(folder, name)
    try:
        try:
            view, done = memoryview(data), 0
            while done < len(data):
                done += os.write(fd, view[done:])
            os.fchmod(fd, mode)
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp)
        raise
    if durable:
        fsync_dir(folder)


def _temp_file(folder: str, name: str) -> tuple[int, str]:
    """A new file `.<name>.<8 random hex digits>.tmp` in `folder` (store/leftovers.py knows the shape), opened
    for writing, mode 0600 until written. Named and opened as tempfile.mkstemp does, at some 15 us less per file:
    no file object, no random-module state."""
    for _ in range(100):
        tmp = f"{folder}/.{name}.{os.urandom(4).hex()}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue  # one chance in four billion: another name
    raise FileExistsError(errno.EEXIST, "no free temp file name", os.path.join(folder, name))


def make_folders(folder: Path, mode: int) -> None:
    """mkdir -p, in one system call when the folder is there already (os.makedirs makes three)."""
    try:
        os.mkdir(folder, mode)
    except FileExistsError:
        return
    except FileNotFoundError:
        make_folders(folder.parent, mode)
        os.mkdir(folder, mode)


def remove_file(path: str | os.PathLike[str]) -> None:
    """unlink, a missing file being no error: Path.unlink(missing_ok=True) for a path kept as text."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a small file, for a comparison with what is to be written: four system calls where
    Path.read_bytes makes seven (a file object asks for the size, whether it is a terminal, and the position)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def write_in_place(path: Path, data: bytes, mode: int) -> None:
    """Overwrite `path` (created when missing) with `data` and fdatasync it: no new inode, and no block allocation
    when the file was about as long already. Not atomic: for a file nobody reads while it is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:  # made under a umask, or by someone else
            os.fchmod(fd, mode)
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.pwrite(fd, view[done:], done)
        os.ftruncate(fd, len(data))
        os.fdatasync(fd)
    finally:
        os.close(fd)


EXCHANGE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP})
"""exchange()'s errors that mean "not here" (file system, kernel, seccomp profile), not a failure of the files."""


def exchange(a: Path, b: Path) -> None:
    """Swap the names `a` and `b` atomically (renameat2 RENAME_EXCHANGE, Linux 3.15; ext4, xfs, btrfs and tmpfs
    have it). OSError otherwise, with an errno of EXCHANGE_UNSUPPORTED where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "the C library has no renameat2", str(a))
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc before 2.28, some other libcs
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    call: Callable[[int, bytes, int, bytes, int], int] = function
    return call


def fsync_dir(path: str | os.PathLike[str]) -> None:
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
