"""CPUSet: a set of CPU (or NUMA node) ids with the Linux list format ("0-3,8-11") both ways. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dra_cpu.errors import DraCpuError


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
            if value < 0:
                raise CPUSetError(f"negative cpu id {value}")
        return cls(values)

    @classmethod
    def parse(cls, text: str) -> CPUSet:
        """Parse the kernel list format; whitespace and a trailing newline are allowed, as sysfs gives them."""
        stripped = text.strip()
        if not stripped:
            return cls()
        ids: set[int] = set()
        for part in stripped.split(","):
            item = part.strip()
            if not item:
                raise CPUSetError(f"empty element in cpu list {text.strip()!r}")
            if "-" in item:
                lo_text, _, hi_text = item.partition("-")
                lo, hi = _parse_id(lo_text, text), _parse_id(hi_text, text)
                if hi < lo:
                    raise CPUSetError(f"descending range {item!r} in cpu list {text.strip()!r}")
                ids.update(range(lo, hi + 1))
            else:
                ids.add(_parse_id(item, text))
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
        raise CPUSetError(f"{field} {text!r}: {err}") from None


def _parse_id(token: str, text: str) -> int:
    token = token.strip()
    if not token.isdigit():
        raise CPUSetError(f"invalid cpu id {token!r} in cpu list {text.strip()!r}")
    return int(token)
