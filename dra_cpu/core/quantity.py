"""Kubernetes quantities ("10", "500m", "2Mi", "1e3") both ways, exact (Fraction, never float). Pure."""

from __future__ import annotations

import re
from fractions import Fraction

from dra_cpu.errors import DraCpuError

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
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$")


class QuantityError(DraCpuError):
    pass


def parse_quantity(text: str | int) -> Fraction:
    if isinstance(text, int):
        return Fraction(text)
    match = _QUANTITY.match(text.strip())
    if not match:
        raise QuantityError(f"invalid quantity {text!r}")
    number, exponent, suffix = match.groups()
    value = Fraction(number)
    if exponent:
        return value * Fraction(10) ** int(exponent[1:])
    suffix = suffix or ""
    return value * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


def whole_quantity(text: str | int, what: str) -> int:
    """A quantity that must be a positive whole number, e.g. a CPU count; `what` names the field in errors."""
    value = parse_quantity(text)
    if value.denominator != 1 or value <= 0:
        raise QuantityError(f"{what} {text!r} must be a positive whole number")
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
