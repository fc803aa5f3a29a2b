"""A typed reader of untyped Kubernetes objects (dicts as the API server or a YAML file gives them). Pure.

Every error names where the value came from, the field path and the value: `claim.yaml: spec.devices.requests[0]
.name must be a non-empty string, not 3`, so that a message in a pod's events or on a terminal is actionable.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

from dra_cpu.core.quantity import QuantityError, parse_quantity
from dra_cpu.errors import DraCpuError, shown

_MAX_PATH = 160


class At:
    """A position in an input object. `source` names the object (a file, a claim) and may be empty.

    A value, never changed once made. Not a frozen dataclass: a prepare reads some forty fields through At, on the
    kubelet's clock, and a frozen dataclass costs five times as much to make. `/` only links the part to its parent;
    the path's text is made when asked for, which is when an error is raised, or never."""

    __slots__ = ("_base", "_parent", "_part", "error", "source")

    def __init__(self, source: str, path: str = "", error: type[DraCpuError] = DraCpuError) -> None:
        self.source = source
        self.error = error
        self._base = path
        self._parent: At | None = None
        self._part: str | int = ""

    @property
    def path(self) -> str:
        if self._parent is None:
            return self._base
        parent, part = self._parent.path, self._part
        if isinstance(part, int):
            return f"{parent}[{part}]"
        return f"{parent}.{part}" if parent else part

    def __truediv__(self, part: str | int) -> At:
        child = At.__new__(At)
        child.source, child.error, child._base, child._parent, child._part = self.source, self.error, "", self, part
        return child

    def __repr__(self) -> str:
        return f"At({self.source!r}, {self.path!r}, {self.error.__name__})"

    def fail(self, what: str) -> DraCpuError:
        where = self.path or "the object"
        if len(where) > _MAX_PATH:  # keys come from outside too
            where = f"{where[: _MAX_PATH // 2]}...{where[-_MAX_PATH // 4 :]}"
        return self.error(f"{self.source}: {where} {what}" if self.source else f"{where} {what}")

    def mapping(self, value: Any, *, optional: bool = True) -> Mapping[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(f"must be an object, not {shown(value)}")
        return value

    def list(self, value: Any, *, optional: bool = True) -> list[Any]:
        if value is None and optional:
            return []
        if not isinstance(value, list):
            raise self.fail(f"must be a list, not {shown(value)}")
        return value

    def items(self, value: Any) -> Iterator[tuple[At, Any]]:
        for index, item in enumerate(self.list(value)):
            yield self / index, item

    def string(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"must be a non-empty string, not {shown(value)}")
        return value

    def quantity(self, value: Any) -> Fraction:
        try:
            return parse_quantity(value if isinstance(value, int | str) else repr(value))
        except QuantityError as err:
            raise self.fail(
                f"must be a quantity, not {shown(value)}" + (f" ({err.reason})" if err.reason else "")
            ) from None
