from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dra_cpu.core.cpuset import MAX_CPUS, MAX_LIST_LENGTH, CPUSet, CPUSetError, parse_field


@pytest.mark.parametrize(
    ("text", "ids", "canonical"),
    [
        ("", [], ""),
        ("\n", [], ""),
        ("0", [0], "0"),
        ("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11], "0-3,8-11"),
        ("3,1,2", [1, 2, 3], "1-3"),
        ("0-0", [0], "0"),
        ("1,3,5", [1, 3, 5], "1,3,5"),
        (" 4-5 , 7 ", [4, 5, 7], "4-5,7"),
    ],
)
def test_parse_and_format(text: str, ids: list[int], canonical: str) -> None:
    cpus = CPUSet.parse(text)
    assert cpus.sorted() == ids
    assert str(cpus) == canonical


@pytest.mark.parametrize("text", ["a", "1-", "-1", "3-1", "1,,2", "1;2", "0x3", "1-2-3", "1.5"])
def test_malformed_lists_name_the_value(text: str) -> None:
    with pytest.raises(CPUSetError) as err:
        CPUSet.parse(text)
    assert repr(text.strip()) in str(err.value)


def test_negative_ids_rejected() -> None:
    with pytest.raises(CPUSetError, match="cpu id -1 is outside 0-16383"):
        CPUSet.of([1, -1])


@pytest.mark.parametrize("text", ["0-99999999", "16384", "0-16384", "1" * 5000, "00000000000000000000016384"])
def test_ids_beyond_max_cpus_are_refused_before_expansion(text: str) -> None:
    started = time.monotonic()
    with pytest.raises(CPUSetError, match=r"--reserved-cpus .*: cpu id .* is outside 0-16383"):
        parse_field("--reserved-cpus", text)
    assert time.monotonic() - started < 0.1


def test_the_largest_list_parses() -> None:
    assert len(CPUSet.parse(f"0-{MAX_CPUS - 1}")) == MAX_CPUS
    assert CPUSet.parse("00007") == CPUSet.of([7])


def test_a_list_longer_than_the_bound_is_refused_with_a_short_message() -> None:
    with pytest.raises(CPUSetError, match=f"longer than {MAX_LIST_LENGTH} characters") as err:
        parse_field("reservedCpus", "0," * MAX_LIST_LENGTH)
    assert len(str(err.value)) < 300


def test_overlapping_ranges_cost_one_expansion() -> None:
    started = time.monotonic()
    assert len(CPUSet.parse(",".join(["0-16383"] * 10_000))) == MAX_CPUS
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("text", ["-", "1-", "3-1", ",", "1,", "\u0661", "\u00b2", "1 2"])
def test_malformed_ranges_are_refused(text: str) -> None:
    with pytest.raises(CPUSetError):
        CPUSet.parse(text)


def test_set_algebra() -> None:
    a, b = CPUSet.parse("0-7"), CPUSet.parse("4-11")
    assert str(a | b) == "0-11"
    assert str(a & b) == "4-7"
    assert str(a - b) == "0-3"
    assert not a.isdisjoint(b)
    assert CPUSet.parse("4-5").issubset(a)
    assert str(CPUSet.union_all([CPUSet.parse("1"), CPUSet.parse("3"), CPUSet()])) == "1,3"
    assert 5 in a and 9 not in a
    assert CPUSet.parse("9,3").first() == 3
    with pytest.raises(CPUSetError):
        CPUSet().first()


@given(st.frozensets(st.integers(min_value=0, max_value=4096)))
def test_round_trip(ids: frozenset[int]) -> None:
    cpus = CPUSet(ids)
    assert CPUSet.parse(str(cpus)) == cpus
    assert len(cpus) == len(ids)
