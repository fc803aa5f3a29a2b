"""numa_maps parsing and placement verification, on recorded samples and on buffers this test binds itself."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from dra_cpu.bench.mempolicy import BoundBuffer, MemPolicyError
from dra_cpu.bench.numa_maps import (
    NumaMapsEntry,
    NumaMapsError,
    entries_covering,
    parse_numa_maps,
    verify_placement,
)
from tests.harness.paths import FIXTURES

SAMPLES = FIXTURES / "numa_maps"
# Addresses of the buffers in the samples (see tests/fixtures/numa_maps/README.md).
SMALL, HUGE, UNTOUCHED = 0x7FAA67400000, 0x7FAA66C00000, 0x7FAA66800000
MIB8 = 8 << 20
PAGE, HUGEPAGE = 4096, 2 << 20


def sample(name: str) -> tuple[NumaMapsEntry, ...]:
    return parse_numa_maps((SAMPLES / name).read_text(), name)


def by_start(entries: tuple[NumaMapsEntry, ...], start: int) -> NumaMapsEntry:
    return next(e for e in entries if e.start == start)


def test_parses_every_line_of_a_real_capture() -> None:
    text = (SAMPLES / "kvm-1node-bound.txt").read_text()
    entries = parse_numa_maps(text)
    assert len(entries) == len(text.splitlines())
    small = by_start(entries, SMALL)
    assert (small.policy, small.pages_by_node, small.page_size_kib, small.huge) == ("bind:0", ((0, 2048),), 4, False)
    huge = by_start(entries, HUGE)
    assert (huge.policy, huge.pages_by_node, huge.page_size_kib, huge.huge) == ("bind:0", ((0, 4),), 2048, True)
    untouched = by_start(entries, UNTOUCHED)
    assert (untouched.pages, untouched.page_size_kib) == (0, 4)


def test_bound_buffers_in_the_real_capture_are_valid() -> None:
    entries = sample("kvm-1node-bound.txt")
    small = verify_placement(entries, SMALL, MIB8, 0, PAGE)
    assert small.valid and small.reason is None and small.expected_pages == 2048 and small.policy == "bind:0"
    assert verify_placement(entries, HUGE, MIB8, 0, HUGEPAGE).valid


def test_untouched_buffer_is_invalid_because_its_pages_are_not_resident() -> None:
    placement = verify_placement(sample("kvm-1node-bound.txt"), UNTOUCHED, 4 << 20, 0, PAGE)
    assert not placement.valid
    assert placement.reason == "only 0 of 1024 pages are resident on requested node 0"


def test_misplaced_buffer_is_rejected_with_the_node_its_pages_landed_on() -> None:
    entries = sample("two-node-edited.txt")
    placement = verify_placement(entries, SMALL, MIB8, 0, PAGE)
    assert not placement.valid
    assert placement.misplaced_pages == 512
    assert placement.reason == "512 of 2048 pages are on node 1, not on requested node 0"
    assert verify_placement(entries, HUGE, MIB8, 1, HUGEPAGE).valid
    assert not verify_placement(entries, HUGE, MIB8, 0, HUGEPAGE).valid


def test_a_buffer_split_over_two_mappings_counts_both() -> None:
    entries = (
        NumaMapsEntry(0x1000, "default", ((0, 1),)),
        NumaMapsEntry(0x10000, "bind:0", ((0, 8),)),
        NumaMapsEntry(0x18000, "bind:0", ((1, 8),)),
        NumaMapsEntry(0x20000, "default", ((1, 99),)),
    )
    assert [e.start for e in entries_covering(entries, 0x10000, 0x10000)] == [0x10000, 0x18000]
    placement = verify_placement(entries, 0x10000, 0x10000, 0, PAGE)
    assert placement.pages_by_node == ((0, 8), (1, 8)) and not placement.valid
    # An address inside a mapping (not at its start) belongs to the mapping that starts below it.
    assert [e.start for e in entries_covering(entries, 0x12000, 0x1000)] == [0x10000]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("zzz default N0=1", "x line 1: start address 'zzz' is not hexadecimal"),
        ("7f00", "x line 1: expected '<address> <policy> ...', found '7f00'"),
        ("7f00 default N0=lots", "x line 1: N0='lots' is not a count"),
        ("7f00 default kernelpagesize_kB=-4", "x line 1: kernelpagesize_kB='-4' is not a count"),
    ],
)
def test_bad_lines_name_the_line_and_value(line: str, message: str) -> None:
    with pytest.raises(NumaMapsError) as err:
        parse_numa_maps(line, "x")
    assert str(err.value) == message


def test_no_mapping_holds_the_address() -> None:
    with pytest.raises(NumaMapsError, match="address 0x10: no mapping"):
        verify_placement((NumaMapsEntry(0x1000, "default", ()),), 0x10, 8, 0, PAGE)


def _live_placement(buffer: BoundBuffer) -> bool:
    entries = parse_numa_maps(Path("/proc/self/numa_maps").read_text())
    return verify_placement(entries, buffer.address, buffer.size, buffer.node, buffer.page_size).valid


def test_a_buffer_bound_here_is_verified_on_node_0_and_not_elsewhere() -> None:
    with BoundBuffer(4 << 20, 0) as buffer:
        assert _live_placement(buffer)
        entries = parse_numa_maps(Path("/proc/self/numa_maps").read_text())
        other = verify_placement(entries, buffer.address, buffer.size, 1, buffer.page_size)
        assert not other.valid and other.misplaced_pages == (4 << 20) // mmap.PAGESIZE


def test_binding_to_a_node_the_machine_lacks_is_a_clear_error() -> None:
    with pytest.raises(MemPolicyError, match=r"^mbind to memory node\(s\) 1000: Invalid argument$"):
        BoundBuffer(1 << 20, 1000)


def test_the_preferred_many_policy_is_one_field() -> None:
    """MPOL_PREFERRED_MANY's name has a space; the page counts after it are still read."""
    [entry] = parse_numa_maps("7f00 prefer (many):0-1 anon=3 dirty=3 N0=2 N1=1 kernelpagesize_kB=4\n")
    assert entry.policy == "prefer (many):0-1"
    assert entry.pages_by_node == ((0, 2), (1, 1))
