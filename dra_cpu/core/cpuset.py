"""CPUSet: a set of CPU (or NUMA node) ids with the Linux list format ("0-3,8-11") both ways. Pure.

Lists come from flags, config files, sysfs and CDI specs, so parsing is bounded before anything is expanded: ids
are below `MAX_CPUS` (Linux's NR_CPUS is at most 8192 on x86-64 distributions, 4096 on arm64; NUMA node ids stay
below 1024), and a list is at most `MAX_LIST_LENGTH` characters, enough for every id of `MAX_CPUS` listed one by
one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dra_cpu.errors import DraCpuError, shown

MAX_CPUS = 16384
MAX_LIST_LENGTH = 6 * MAX_CPUS


class CPUSetError(DraCpuError, ValueError):
    """A cpu list that the kernel's list format does not allow."""


@dataclass(frozen=True, slots=True)
class CPUSet:
    """An immutable set of non-negative ids, ordered when iterated.

    The same type serves CPU ids and NUMA node ids (cpuset.mems uses the same list format).
    """

    ids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, ids: Iterable[int]) -> CPUSet:
        values = frozenset(ids)
        for value in values:
            if not 0 <= value < MAX_CPUS:
                raise CPUSetError(f"cpu id {shown(value)} is outside 0-{MAX_CPUS - 1}")
        return cls(values)

    @classmethod
    def parse(cls, text: str) -> CPUSet:
        """Parse the kernel list format; whitespace and a trailing newline are allowed, as sysfs gives them."""
        if len(text) > MAX_LIST_LENGTH:
            raise CPUSetError(f"cpu list {shown(text)} is longer than {MAX_LIST_LENGTH} characters")
        stripped = text.strip()
        if not stripped:
            return cls()
        ranges: list[tuple[int, int]] = []
        for part in stripped.split(","):
            item = part.strip()
            if not item:
                raise CPUSetError(f"empty element in cpu list {shown(stripped)}")
            if "-" in item:
                lo_text, _, hi_text = item.partition("-")
                lo, hi = _parse_id(lo_text, stripped), _parse_id(hi_text, stripped)
                if hi < lo:
                    raise CPUSetError(f"descending range {shown(item)} in cpu list {shown(stripped)}")
                ranges.append((lo, hi))
            else:
                ranges.append((_parse_id(item, stripped),) * 2)
        # Merged before expansion: "0-16383" repeated a thousand times costs one range, not a thousand.
        ids: set[int] = set()
        end = -1
        for lo, hi in sorted(ranges):
            ids.update(range(max(lo, end + 1), hi + 1))
            end = max(end, hi)
        return cls(frozenset(ids))

    def __str__(self) -> str:
        """The kernel list format, with ranges for runs of two or more ids (as the kernel prints them)."""
        parts: list[str] = []
        for lo, hi in self.ranges():
            parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
        return ",".join(parts)

    def ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for value in sorted(self.ids):
            if out and out[-1][1] == value - 1:
                out[-1] = (out[-1][0], value)
            else:
                out.append((value, value))
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, value: object) -> bool:
        return value in self.ids

    def __bool__(self) -> bool:
        return bool(self.ids)

    def __or__(self, other: CPUSet) -> CPUSet:
        return CPUSet(self.ids | other.ids)

    def __and__(self, other: CPUSet) -> CPUSet:
        return CPUSet(self.ids & other.ids)

    def __sub__(self, other: CPUSet) -> CPUSet:
        return CPUSet(self.ids - other.ids)

    def isdisjoint(self, other: CPUSet) -> bool:
        return self.ids.isdisjoint(other.ids)

    def issubset(self, other: CPUSet) -> bool:
        return self.ids <= other.ids

    def sorted(self) -> list[int]:
        return sorted(self.ids)

    def first(self) -> int:
        if not self.ids:
            raise CPUSetError("empty cpu set has no first cpu")
        return min(self.ids)

    @staticmethod
    def union_all(sets: Iterable[CPUSet]) -> CPUSet:
        ids: set[int] = set()
        for cpuset in sets:
            ids.update(cpuset.ids)
        return CPUSet(frozenset(ids))


def parse_field(field: str, text: str) -> CPUSet:
    """CPUSet.parse, with the error naming the flag or config key the list came from."""
    try:
        return CPUSet.parse(text)
    except CPUSetError as err:
        raise CPUSetError(f"{field} {shown(text)}: {err}") from None


def _parse_id(token: str, text: str) -> int:
    token = token.strip()
    # isdigit() alone takes other scripts' digits; the length check keeps int() from reading a million digits.
    if not (token.isascii() and token.isdigit()):
        raise CPUSetError(f"invalid cpu id {shown(token)} in cpu list {shown(text)}")
    if len(token.lstrip("0")) > len(str(MAX_CPUS)) or int(token) >= MAX_CPUS:
        raise CPUSetError(f"cpu id {shown(token)} in cpu list {shown(text)} is outside 0-{MAX_CPUS - 1}")
    return int(token)
