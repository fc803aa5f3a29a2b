"""Kubernetes quantities ("10", "500m", "2Mi", "1e3") both ways, exact (Fraction, never float). Pure.

Bounded as resource.Quantity is (k8s.io/apimachinery/pkg/api/resource): a value is rounded up, away from zero, to
a whole number of nanos (1n), and its magnitude must fit an int64; the text itself is at most
`MAX_QUANTITY_LENGTH` characters. So a quantity costs the same to parse, compare and add whatever it says:
`1e999999999` is refused at once instead of becoming a billion-digit Fraction.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from dra_cpu.errors import DraCpuError, shown

# Longer than any quantity Kubernetes writes ("9223372036854775807", "0.000000001", "1.5Gi"), short enough that
# the digits never cost anything.
MAX_QUANTITY_LENGTH = 64
# resource.Quantity holds at most an int64 (2^63-1) ...
MAX_QUANTITY = (1 << 63) - 1
# ... and nothing finer than 1n: smaller non-zero values round up to it ("you asked for some, you get some").
NANOS = 10**9
_INT64_DIGITS = len(str(MAX_QUANTITY))

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$", re.ASCII)


class QuantityError(DraCpuError):
    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        # Why a well-formed quantity is refused ("out of range: ..."), for messages that name the value themselves.
        self.reason = reason


def parse_quantity(text: str | int) -> Fraction:
    """The exact value of a quantity, in whole nanos; QuantityError naming the value when it is not a quantity or
    its magnitude exceeds an int64."""
    if isinstance(text, int):
        return _bounded(Fraction(text), text)
    if text.isdigit() and text.isascii() and len(text) <= _INT64_DIGITS:
        # The common case ("1", "4", "1073741824"): a whole number, exact as it is, and in range as its length
        # says; one Fraction instead of the nine of the general path, on every prepare.
        value = int(text)
        if value <= MAX_QUANTITY:
            return Fraction(value)
    stripped = text.strip()
    if len(stripped) > MAX_QUANTITY_LENGTH:
        reason = f"longer than {MAX_QUANTITY_LENGTH} characters"
        raise QuantityError(f"invalid quantity {shown(text)}: {reason}", reason)
    match = _QUANTITY.match(stripped)
    if not match:
        raise QuantityError(f"invalid quantity {shown(text)}")
    number, exponent, suffix = match.groups()
    mantissa = Fraction(number)  # at most MAX_QUANTITY_LENGTH digits
    if mantissa == 0:
        return Fraction(0)
    if not exponent:
        suffix = suffix or ""
        return _bounded(mantissa * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix]), text)
    power = int(exponent[1:])
    # |mantissa| lies within 10^±MAX_QUANTITY_LENGTH: beyond these powers the value is surely out of range, or
    # surely below 1n, without computing 10^power.
    if power > 19 + MAX_QUANTITY_LENGTH:
        raise _out_of_range(text)
    if power < -9 - 2 * MAX_QUANTITY_LENGTH:
        return Fraction(int(math.copysign(1, mantissa)), NANOS)
    return _bounded(mantissa * Fraction(10) ** power, text)


def _bounded(value: Fraction, text: str | int) -> Fraction:
    if abs(value) > MAX_QUANTITY:
        raise _out_of_range(text)
    nanos = -((-abs(value) * NANOS) // 1)  # rounded up, away from zero, as resource.Quantity does
    return Fraction(nanos if value > 0 else -nanos, NANOS)


def _out_of_range(text: str | int) -> QuantityError:
    reason = "out of range: its magnitude must be at most 2^63-1"
    return QuantityError(f"quantity {shown(text)} is {reason}", reason)


def whole_quantity(text: str | int, what: str) -> int:
    """A quantity that must be a positive whole number, e.g. a CPU count; `what` names the field in errors."""
    try:
        value = parse_quantity(text)
    except QuantityError as err:
        raise QuantityError(f"{what}: {err}", err.reason) from None
    if value.denominator != 1 or value <= 0:
        raise QuantityError(f"{what} {shown(text)} must be a positive whole number")
    return int(value)


def format_bytes(value: int) -> str:
    """Canonical binary form, so what we send compares equal to what the API server stores."""
    for suffix, size in (
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ):
        if value and value % size == 0:
            return f"{value // size}{suffix}"
    return str(value)
