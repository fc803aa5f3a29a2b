"""Quantities from outside are bounded as resource.Quantity bounds them: int64 magnitude, nano precision."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dra_cpu.core.quantity import MAX_QUANTITY, QuantityError, parse_quantity, whole_quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10", 10),
        ("500m", Fraction(1, 2)),
        ("2Mi", 2 << 20),
        ("1e3", 1000),
        ("1.5Gi", 3 << 29),
        ("-4", -4),
        ("+.5", Fraction(1, 2)),
        ("0e999999999", 0),
        ("9223372036854775807", MAX_QUANTITY),
        (MAX_QUANTITY, MAX_QUANTITY),
    ],
)
def test_parses_kubernetes_quantities(text: str | int, value: Fraction | int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["1e999999999", "9223372036854775808", "8Ei", "-1e19", "1" * 40, 10**40])
def test_a_magnitude_beyond_int64_is_refused_at_once_naming_the_value(text: str | int) -> None:
    started = time.monotonic()
    with pytest.raises(QuantityError, match=r"out of range|longer than"):
        parse_quantity(text)
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize(
    ("text", "value"), [("1e-999999", 1), ("0.5n", 1), ("-1e-10", -1), ("1.0000000001", 10**9 + 1)]
)
def test_values_finer_than_a_nano_round_up_away_from_zero(text: str, value: int) -> None:
    assert parse_quantity(text) == Fraction(value, 10**9)


def test_a_huge_digit_string_is_refused_with_a_short_message() -> None:
    with pytest.raises(QuantityError) as err:
        parse_quantity("9" * 1_000_000)
    assert "longer than 64 characters" in str(err.value)
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("text", ["\u0661", "1e", "e3", "1Ki2", "--1", "0x10", "", " "])
def test_malformed_quantities_are_refused(text: str) -> None:
    with pytest.raises(QuantityError, match="invalid quantity"):
        parse_quantity(text)


def test_whole_quantity_names_the_field() -> None:
    expected = r"consumedCapacity\['dra.cpu/cpu'\]: quantity '1e999999999' is out of range"
    with pytest.raises(QuantityError, match=expected):
        whole_quantity("1e999999999", "consumedCapacity['dra.cpu/cpu']")


@given(st.integers(min_value=0, max_value=1 << 64) | st.integers(min_value=0, max_value=999).map(lambda n: n * 10**16))
def test_a_plain_whole_number_reads_as_the_general_path_reads_it(value: int) -> None:
    # "e0" takes the general path; the plain digits the shortcut for whole numbers.
    try:
        expected: Fraction | str = parse_quantity(f"{value}e0")
    except QuantityError as err:
        expected = str(err).replace(f"{value}e0", str(value))
    try:
        got: Fraction | str = parse_quantity(str(value))
    except QuantityError as err:
        got = str(err)
    assert got == expected
