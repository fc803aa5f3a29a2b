"""Memory placement through the kernel's mbind syscall via ctypes, so no libnuma is needed.

glibc does not wrap mbind (libnuma does), so it goes through syscall(2) with per-architecture numbers. mbind on the
buffer rather than set_mempolicy on the thread: the policy then belongs to the memory, whichever thread touches it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
from types import TracebackType

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError

# mbind per `uname -m`, from the kernel's syscall tables.
_MBIND = {"x86_64": 237, "aarch64": 235, "ppc64le": 259, "s390x": 268, "riscv64": 235}
MPOL_BIND = 2
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MAP_HUGETLB = 0x40000
# MAP_HUGE_2MB: the log2 of the page size in the bits above MAP_HUGE_SHIFT (26); asks for 2 MiB pages explicitly
# rather than whatever the default hugepage size is.
MAP_HUGE_2MB = 21 << 26
HUGEPAGE_2M_BYTES = 2 * 1024 * 1024

_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8


class MemPolicyError(DraCpuError):
    """The kernel refused a memory placement."""


def _mbind_number() -> int:
    machine = platform.machine()
    try:
        return _MBIND[machine]
    except KeyError:
        raise MemPolicyError(f"machine {machine!r}: the mbind syscall number is not known") from None


def _nodemask(nodes: CPUSet) -> tuple[ctypes.Array[ctypes.c_ulong], int]:
    """The kernel's nodemask_t as an array of longs, and the `maxnode` to pass with it.

    The kernel reads maxnode-1 bits (a historical off-by-one that libnuma also compensates), hence the +1.
    """
    words = max(nodes.ids, default=0) // _ULONG_BITS + 1
    mask = (ctypes.c_ulong * words)()
    for node in nodes:
        mask[node // _ULONG_BITS] |= 1 << (node % _ULONG_BITS)
    return mask, words * _ULONG_BITS + 1


def mbind(address: int, length: int, nodes: CPUSet) -> None:
    """Bind [address, address+length) to `nodes`; pages faulted later come only from there (MPOL_BIND)."""
    mask, maxnode = _nodemask(nodes)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        ctypes.c_long(_mbind_number()),
        ctypes.c_void_p(address),
        ctypes.c_ulong(length),
        ctypes.c_int(MPOL_BIND),
        mask,
        ctypes.c_ulong(maxnode),
        ctypes.c_uint(MPOL_MF_STRICT | MPOL_MF_MOVE),
    )
    if result != 0:
        raise MemPolicyError(f"mbind to memory node(s) {nodes}: {os.strerror(ctypes.get_errno())}")


class BoundBuffer:
    """An anonymous mapping whose pages all come from one NUMA node, faulted in before use.

    The binding is set before the first touch, so the kernel allocates each page on the node directly; whether it
    really did is for the caller to check in numa_maps (see numa_maps.verify_placement).
    """

    def __init__(self, size: int, node: int, *, hugepages: bool = False) -> None:
        if hugepages and size % HUGEPAGE_2M_BYTES:
            raise MemPolicyError(f"size {size}: must be a multiple of 2 MiB with hugepages")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_HUGETLB | MAP_HUGE_2MB if hugepages else 0)
        try:
            self.map = mmap.mmap(-1, size, flags=flags)
        except OSError as err:
            kind = "2 MiB hugepages" if hugepages else "memory"
            raise MemPolicyError(f"cannot map {size} bytes of {kind}: {err.strerror}") from None
        self.size = size
        self.node = node
        self.hugepages = hugepages
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        try:
            mbind(self.address, size, CPUSet.of([node]))
            # One write per page would do; memset is the fastest way to make the kernel fault them all in.
            ctypes.memset(self.address, 0, size)
        except BaseException:
            self.map.close()
            raise

    @property
    def page_size(self) -> int:
        return HUGEPAGE_2M_BYTES if self.hugepages else mmap.PAGESIZE

    def close(self) -> None:
        self.map.close()

    def __enter__(self) -> BoundBuffer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
