from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dra_cpu.core.cpuset import CPUSet, CPUSetError


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
    with pytest.raises(CPUSetError, match="negative cpu id -1"):
        CPUSet.of([1, -1])


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
