"""Narrowing for values whose static type is looser than what the test knows: JSON and YAML documents (the
kubernetes client's CustomObjectsApi answers `object`), and optional fields the test has just seen set.

Each helper asserts what it claims, so a surprise fails the test where it happens, naming what was there."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def present(value: T | None, what: str = "the value") -> T:
    """`value`, which must not be None (an optional field the server or the code under test is known to fill)."""
    assert value is not None, f"{what} is missing"
    return value


def as_dict(value: object, what: str = "the document") -> dict[str, Any]:
    """`value` as a JSON or YAML object (a mapping with string keys)."""
    assert isinstance(value, dict), f"{what} is a {type(value).__name__}, not a mapping"
    return value
