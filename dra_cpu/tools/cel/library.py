"""The Kubernetes DRA CEL environment over cel-python (celpy): the `device` variable, the quantity and semver
libraries and the string extensions, and the bounds Kubernetes puts on a selector. Pure.

Kubernetes (k8s.io/api resource/v1) bounds a selector's text to `CELSelectorExpressionMaxLength` (10 Ki) and its
cost to `CELSelectorExpressionMaxCost` (1,000,000), which kube-scheduler also enforces at runtime. Here the cost
is counted while evaluating: every node of celpy's parse tree visited costs `VISIT_COST`, plus a tenth of the
length of each string, list or map it yields, so that comprehensions (`all`, `exists`, `map`, `filter`) and
growing values run out of budget instead of running away. celpy visits some 100,000 nodes a second, so the
budget ends any evaluation within seconds; it is stricter than Kubernetes' estimate, which counts CEL's own
operations (about a tenth of celpy's nodes). celpy evaluates recursively, so the parse tree's depth is bounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import cache, total_ordering
from typing import Any

import celpy
from celpy import celtypes
from celpy.evaluation import Evaluator, base_functions, operator_in
from lark import Token
from lark import Tree as LarkTree

from dra_cpu.core.quantity import QuantityError, parse_quantity
from dra_cpu.errors import DraCpuError

Tree = LarkTree[Token]
Node = Tree | Token


# k8s.io/api resource/v1 CELSelectorExpressionMaxLength and CELSelectorExpressionMaxCost.
MAX_EXPRESSION_LENGTH = 10 * 1024
MAX_COST = 1_000_000
VISIT_COST = 10
# Levels of celpy's parse tree (a parenthesis costs about ten, an operator of a chain one): celpy's recursive walks
# take about five frames a level, which fits the recursion limit celpy sets (2500) with room for the caller's.
MAX_DEPTH = 250


class CelError(DraCpuError):
    """A selector that does not compile: a syntax error, or a type error Kubernetes would reject."""


class CelCostError(CelError):
    """An evaluation that ran out of its cost budget."""


class Budget:
    """What one evaluation may still spend; shared by the nested evaluators of comprehensions."""

    def __init__(self, limit: int = MAX_COST) -> None:
        self.limit = limit
        self.left = limit

    def spend(self, value: Any) -> None:
        size = len(value) if isinstance(value, str | bytes | list | dict) else 0
        self.left -= VISIT_COST + size // 10
        if self.left < 0:
            raise CelCostError(f"exceeds the cost limit of {self.limit}")


class _BudgetedEvaluator(Evaluator):
    """celpy's evaluator, charging every visited node to a Budget."""

    def __init__(self, ast: Tree, activation: Any, budget: Budget) -> None:
        super().__init__(ast, activation)
        self.budget = budget

    def sub_evaluator(self, ast: Tree) -> Evaluator:
        return _BudgetedEvaluator(ast, self.activation, self.budget)

    def _visit_tree(self, tree: Tree) -> Any:
        result = super()._visit_tree(tree)
        self.budget.spend(result)
        return result


def evaluate(text: str, values: Mapping[str, Any], budget: Budget, tree: Tree | None = None) -> Any:
    """Evaluates a selector (or a part of one) within `budget`; CelCostError when it runs out. `tree` is the
    part's own parse tree, for a part whose text lark cannot locate (a bare literal has no position)."""
    runner = program(text if text.strip() or tree is None else "true")
    return _BudgetedEvaluator(tree or runner.ast, runner.new_activation(), budget).evaluate(dict(values))


def depth(tree: Tree) -> int:
    """The parse tree's depth, counted without recursion (the tree may be too deep for it)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node.children if isinstance(child, LarkTree))
    return deepest


@dataclass(frozen=True)
class Quantity:
    """A resource.Quantity as CEL sees it: exact, compared by value."""

    value: Fraction

    def __str__(self) -> str:
        return str(self.value.numerator) if self.value.denominator == 1 else str(float(self.value))


_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?$"
)


@total_ordering
@dataclass(frozen=True, eq=False)
class Semver:
    """A version attribute: semver 2.0 precedence (build metadata ignored, a pre-release sorts first)."""

    text: str
    core: tuple[int, int, int]
    prerelease: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Semver:
        match = _SEMVER.match(text)
        if not match:
            raise ValueError(f"invalid semver {text!r}")
        major, minor, patch, pre = match.groups()
        return cls(text, (int(major), int(minor), int(patch)), tuple(pre.split(".")) if pre else ())

    def _key(self) -> tuple[tuple[int, int, int], bool, tuple[tuple[bool, int, str], ...]]:
        # Numeric identifiers sort before alphanumeric ones, and numerically among themselves.
        pre = tuple((not p.isdigit(), int(p) if p.isdigit() else 0, p) for p in self.prerelease)
        return self.core, not self.prerelease, pre

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Semver) and self._key() == other._key()

    def __lt__(self, other: Semver) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text


ScalarValue = bool | int | str | Semver
# A list attribute (KEP-5491, `ints`/`bools`/`strings`/`versions`; gate DRAListTypeAttributes): a non-empty tuple of
# one kind of scalar.
AttributeValue = ScalarValue | tuple[ScalarValue, ...]


@dataclass(frozen=True)
class CelDevice:
    """What a selector sees of one device. Attribute and capacity keys are fully qualified (`domain/id`)."""

    driver: str
    attributes: Mapping[str, AttributeValue]
    capacity: Mapping[str, Fraction]
    allow_multiple_allocations: bool


DEVICE_FIELDS = {"driver": "string", "attributes": "map", "capacity": "map", "allowMultipleAllocations": "bool"}
MACROS = {"has", "all", "exists", "exists_one", "map", "filter"}


def _compare(a: Any, b: Any) -> celtypes.IntType:
    if type(a) is not type(b) or not isinstance(a, Quantity | Semver):
        raise TypeError(f"no such overload: compareTo({type(a).__name__}, {type(b).__name__})")
    if isinstance(a, Quantity) and isinstance(b, Quantity):
        return celtypes.IntType((a.value > b.value) - (a.value < b.value))
    return celtypes.IntType((a > b) - (a < b))


def _quantity(text: Any) -> Quantity:
    try:
        return Quantity(parse_quantity(str(text)))
    except QuantityError as err:
        raise ValueError(str(err)) from None


def _is(parse: Callable[[Any], object]) -> Callable[[Any], celtypes.BoolType]:
    def check(text: Any) -> celtypes.BoolType:
        try:
            parse(text)
        except ValueError:
            return celtypes.BoolType(False)
        return celtypes.BoolType(True)

    return check


def _quantity_arith(sign: int) -> Callable[[Quantity, Any], Quantity]:
    def arith(q: Quantity, other: Any) -> Quantity:
        amount = other.value if isinstance(other, Quantity) else Fraction(int(other))
        return Quantity(q.value + sign * amount)

    return arith


def _semver(text: Any) -> Semver:
    return Semver.parse(str(text))


def _as_integer(q: Quantity) -> celtypes.IntType:
    if q.value.denominator != 1:
        raise ValueError(f"quantity {q} is not an integer")
    return celtypes.IntType(q.value.numerator)


def _sign(q: Quantity) -> celtypes.IntType:
    return celtypes.IntType((q.value > 0) - (q.value < 0))


def _semver_part(index: int) -> Callable[[Semver], celtypes.IntType]:
    return lambda v: celtypes.IntType(v.core[index])


def _split(text: Any, sep: Any) -> celtypes.ListType:
    return celtypes.ListType(celtypes.StringType(part) for part in str(text).split(str(sep)))


def _in(item: Any, container: Any) -> Any:
    """CEL's `in` has overloads for lists and maps only: on a scalar attribute (another driver's scalar pcieRoot,
    say) it is a runtime error, which celpy would answer with false."""
    if not isinstance(container, celtypes.ListType | celtypes.MapType):
        raise TypeError(f"no such overload: in({type(item).__name__}, {type(container).__name__})")
    return operator_in(item, container)


def _includes(target: Any, element: Any) -> celtypes.BoolType:
    """Kubernetes' `includes` (with DRAListTypeAttributes): a list holds the element, or a scalar equals it, so
    that one expression serves an attribute that is a list on some devices and a scalar on others."""
    items = target if isinstance(target, celtypes.ListType) else [target]
    return celtypes.BoolType(any(type(item) is type(element) and item == element for item in items))


# The Kubernetes CEL libraries a device selector may call, beyond celpy's standard ones.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quantity": _quantity,
    "isQuantity": _is(_quantity),
    "semver": _semver,
    "isSemver": _is(_semver),
    "compareTo": _compare,
    "isGreaterThan": lambda a, b: celtypes.BoolType(_compare(a, b) > 0),
    "isLessThan": lambda a, b: celtypes.BoolType(_compare(a, b) < 0),
    "add": _quantity_arith(1),
    "sub": _quantity_arith(-1),
    "asInteger": _as_integer,
    "isInteger": lambda q: celtypes.BoolType(q.value.denominator == 1),
    "asApproximateFloat": lambda q: celtypes.DoubleType(float(q.value)),
    "sign": _sign,
    "major": _semver_part(0),
    "minor": _semver_part(1),
    "patch": _semver_part(2),
    "lowerAscii": lambda s: celtypes.StringType(str(s).lower()),
    "upperAscii": lambda s: celtypes.StringType(str(s).upper()),
    "trim": lambda s: celtypes.StringType(str(s).strip()),
    "split": _split,
    "includes": _includes,
    "_in_": _in,
}
KNOWN_FUNCTIONS = set(base_functions) | set(FUNCTIONS) | MACROS


class _Domains(celtypes.MapType):
    """`device.attributes` and `device.capacity`: an unknown domain is an empty map, as in Kubernetes."""

    def __getitem__(self, key: Any) -> Any:
        return super().get(key, celtypes.MapType())


def _cel_value(value: AttributeValue) -> Any:
    if isinstance(value, tuple):
        return celtypes.ListType(_cel_value(item) for item in value)
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    return value


def _grouped(values: Mapping[str, Any]) -> _Domains:
    domains: dict[str, dict[Any, Any]] = {}
    for key, value in values.items():
        domain, _, name = key.rpartition("/")
        domains.setdefault(domain, {})[celtypes.StringType(name)] = value
    return _Domains({celtypes.StringType(d): celtypes.MapType(ids) for d, ids in domains.items()})


def activation(device: CelDevice) -> dict[str, Any]:
    return {
        "device": celtypes.MapType(
            {
                celtypes.StringType("driver"): celtypes.StringType(device.driver),
                celtypes.StringType("attributes"): _grouped({k: _cel_value(v) for k, v in device.attributes.items()}),
                celtypes.StringType("capacity"): _grouped({k: Quantity(v) for k, v in device.capacity.items()}),
                celtypes.StringType("allowMultipleAllocations"): celtypes.BoolType(device.allow_multiple_allocations),
            }
        )
    }


@cache
def environment() -> celpy.Environment:
    """Built on first use: building the parser takes a tenth of a second that other commands need not pay."""
    return celpy.Environment()


# Wrappers around a single child that carry no meaning of their own for the explanation.
def parse(text: str) -> Tree:
    return environment().compile(text)


@cache
def program(text: str) -> celpy.Runner:
    return environment().program(parse(text), functions=FUNCTIONS)
