"""/proc/<pid>/numa_maps parsing and placement verification. Pure: the caller reads the file.

A line is `<start address hex> <policy> [key=value | flag]...`, where `N<node>=<pages>` counts the mapping's
resident pages per node and `kernelpagesize_kB` their size. The kernel escapes whitespace in `file=` paths, so
splitting on whitespace is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dra_cpu.errors import DraCpuError

_DEFAULT_PAGE_KIB = 4


class NumaMapsError(DraCpuError):
    """A numa_maps line that the kernel would not write."""


@dataclass(frozen=True, slots=True)
class NumaMapsEntry:
    """One mapping (VMA): where it starts, its memory policy and its resident pages per node."""

    start: int
    policy: str
    pages_by_node: tuple[tuple[int, int], ...]
    page_size_kib: int = _DEFAULT_PAGE_KIB
    huge: bool = False

    @property
    def pages(self) -> int:
        return sum(pages for _, pages in self.pages_by_node)


def parse_numa_maps(text: str, source: str = "numa_maps") -> tuple[NumaMapsEntry, ...]:
    return tuple(_parse_line(line, f"{source} line {n}") for n, line in enumerate(text.splitlines(), 1) if line)


def _parse_line(line: str, where: str) -> NumaMapsEntry:
    fields = line.split()
    if len(fields) < 2:
        raise NumaMapsError(f"{where}: expected '<address> <policy> ...', found {line!r}")
    try:
        start = int(fields[0], 16)
    except ValueError:
        raise NumaMapsError(f"{where}: start address {fields[0]!r} is not hexadecimal") from None
    pages: dict[int, int] = {}
    page_kib = _DEFAULT_PAGE_KIB
    policy, rest = fields[1], fields[2:]
    if policy == "prefer" and rest and rest[0].startswith("(many)"):
        # MPOL_PREFERRED_MANY is the one policy whose name has a space: "prefer (many):0-1".
        policy, rest = f"prefer {rest[0]}", rest[1:]
    for item in rest:
        key, sep, value = item.partition("=")
        if sep and key == "kernelpagesize_kB":
            page_kib = _count(value, key, where)
        elif sep and len(key) > 1 and key[0] == "N" and key[1:].isdigit():
            pages[int(key[1:])] = _count(value, key, where)
    return NumaMapsEntry(start, policy, tuple(sorted(pages.items())), page_kib, "huge" in rest)


def _count(value: str, key: str, where: str) -> int:
    if not value.isdigit():
        raise NumaMapsError(f"{where}: {key}={value!r} is not a count")
    return int(value)


def entries_covering(entries: Iterable[NumaMapsEntry], start: int, length: int) -> tuple[NumaMapsEntry, ...]:
    """The mappings that hold [start, start+length): the one containing `start` and any that begin inside.

    numa_maps gives no end addresses, but a mapped address always lies in the last mapping starting at or below it.
    """
    ordered = sorted(entries, key=lambda e: e.start)
    containing = [e for e in ordered if e.start <= start]
    inside = [e for e in ordered if start < e.start < start + length]
    return tuple(containing[-1:] + inside)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a buffer's pages really are, against where they were asked to be."""

    requested_node: int
    expected_pages: int
    pages_by_node: tuple[tuple[int, int], ...]
    policy: str

    @property
    def misplaced_pages(self) -> int:
        return sum(pages for node, pages in self.pages_by_node if node != self.requested_node)

    @property
    def placed_pages(self) -> int:
        return dict(self.pages_by_node).get(self.requested_node, 0)

    @property
    def valid(self) -> bool:
        return self.misplaced_pages == 0 and self.placed_pages >= self.expected_pages

    @property
    def reason(self) -> str | None:
        """Why the placement is invalid, in words; None when it is valid."""
        if self.misplaced_pages:
            elsewhere = ",".join(str(n) for n, p in self.pages_by_node if n != self.requested_node and p)
            return (
                f"{self.misplaced_pages} of {self.placed_pages + self.misplaced_pages} pages are on node "
                f"{elsewhere}, not on requested node {self.requested_node}"
            )
        if self.placed_pages < self.expected_pages:
            return (
                f"only {self.placed_pages} of {self.expected_pages} pages are resident on requested node "
                f"{self.requested_node}"
            )
        return None


def verify_placement(entries: Sequence[NumaMapsEntry], start: int, length: int, node: int, page_size: int) -> Placement:
    """Check that every page of [start, start+length) is resident on `node`, from a numa_maps read after touching.

    A mapping the kernel merged with a neighbour counts the neighbour's pages too: pages found on another node then
    make the result invalid, which errs on the side of not printing a figure that might be wrong.
    """
    covering = entries_covering(entries, start, length)
    if not covering:
        raise NumaMapsError(f"address {start:#x}: no mapping in numa_maps holds it")
    totals: dict[int, int] = {}
    for entry in covering:
        for entry_node, pages in entry.pages_by_node:
            totals[entry_node] = totals.get(entry_node, 0) + pages
    policies = sorted({e.policy for e in covering})
    return Placement(node, -(-length // page_size), tuple(sorted(totals.items())), ",".join(policies))
