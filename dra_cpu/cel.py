"""Device selectors in the Kubernetes DRA CEL environment, over cel-python (celpy). Pure.

The scheduler compiles every selector against one variable, `device` (`driver`, `attributes["domain"].id`,
`capacity["domain"].id` as quantities, `allowMultipleAllocations`), with the Kubernetes quantity and semver
libraries and the string extensions. celpy has no type checker, so the mistakes Kubernetes rejects at compile time
that we can see without one (an unknown `device` field, an unknown function, comparing a string with a number) are
checked on the parse tree, and every error names its line and column.

When a selector is false for a device, `Selector.evaluate` walks down the `&&`s to the first operand that is false
and shows the device values it read: that operand is why the device does not match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import cache, total_ordering
from typing import Any

import celpy
from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, base_functions
from lark import Token
from lark import Tree as LarkTree
from lark import exceptions as lark_exceptions

from dra_cpu.errors import DraCpuError
from dra_cpu.quantity import QuantityError, parse_quantity

Tree = LarkTree[Token]
Node = Tree | Token


class CelError(DraCpuError):
    """A selector that does not compile: a syntax error, or a type error Kubernetes would reject."""


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


AttributeValue = bool | int | str | Semver


@dataclass(frozen=True)
class CelDevice:
    """What a selector sees of one device. Attribute and capacity keys are fully qualified (`domain/id`)."""

    driver: str
    attributes: Mapping[str, AttributeValue]
    capacity: Mapping[str, Fraction]
    allow_multiple_allocations: bool


@dataclass(frozen=True)
class Verdict:
    matches: bool
    reason: str = ""
    # A runtime error, such as a missing attribute: the scheduler then stops allocating the whole claim.
    error: bool = False


DEVICE_FIELDS = {"driver": "string", "attributes": "map", "capacity": "map", "allowMultipleAllocations": "bool"}
_MACROS = {"has", "all", "exists", "exists_one", "map", "filter"}


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
}
_KNOWN_FUNCTIONS = set(base_functions) | set(FUNCTIONS) | _MACROS


class _Domains(celtypes.MapType):
    """`device.attributes` and `device.capacity`: an unknown domain is an empty map, as in Kubernetes."""

    def __getitem__(self, key: Any) -> Any:
        return super().get(key, celtypes.MapType())


def _cel_value(value: AttributeValue) -> Any:
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
def _environment() -> celpy.Environment:
    """Built on first use: building the parser takes a tenth of a second that other commands need not pay."""
    return celpy.Environment()


# Wrappers around a single child that carry no meaning of their own for the explanation.
_WRAPPERS = {
    "expr",
    "conditionalor",
    "conditionaland",
    "relation",
    "addition",
    "multiplication",
    "unary",
    "member",
    "primary",
    "paren_expr",
}
_RELATIONS = {
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
}
_NUMBERS = {"int", "uint", "double"}


@dataclass(frozen=True, eq=False)
class Selector:
    """One compiled CEL selector; `where` names it in messages (e.g. `DeviceClass dra.cpu selectors[0]`)."""

    expression: str
    where: str
    tree: Tree

    def evaluate(self, device: CelDevice) -> Verdict:
        values = activation(device)
        result = self._eval(self.tree, values)
        if isinstance(result, CELEvalError):
            return Verdict(False, self._runtime_error(result), error=True)
        if not isinstance(result, celtypes.BoolType):
            return Verdict(False, f"{self.where} returned {result!r}, not a bool", error=True)
        if result:
            return Verdict(True)
        return Verdict(False, f"{self.where}: {self._why_false(self.tree, values)}")

    def _eval(self, tree: Node, values: dict[str, Any]) -> Any:
        # Sub-trees are re-parsed from their text: celpy evaluates whole expressions only. Nothing below an
        # `&&` or `||` that we descend into binds a variable, so each such text stands on its own.
        program = _program(self._text(tree))
        try:
            return program.evaluate(values)
        except CELEvalError as err:
            return err
        except (TypeError, ValueError, ArithmeticError) as err:
            return CELEvalError(str(err), type(err), None, tree=tree if isinstance(tree, LarkTree) else None)

    def _text(self, node: Node) -> str:
        start, end = _span(node)
        return self.expression[start:end]

    def _why_false(self, tree: Node, values: dict[str, Any]) -> str:
        node = _unwrap(tree)
        if isinstance(node, LarkTree) and node.data == "conditionaland" and len(node.children) == 2:
            for child in node.children:
                result = self._eval(child, values)
                if isinstance(result, CELEvalError):
                    return self._runtime_error(result)
                if result is not None and not result:
                    return self._why_false(child, values)
        shown = [f"{name} is {value}" for name, value in self._reads(node, values)]
        return f"{self._text(node)!r} is false" + (f" ({', '.join(shown)})" if shown else "")

    def _reads(self, node: Node, values: dict[str, Any]) -> Iterator[tuple[str, str]]:
        """The device fields an expression reads, named as in the slice, with their values on this device."""
        seen = set()
        for path in _device_paths(node):
            name = _field_name(path) or self._text(path)
            if name in seen:
                continue
            seen.add(name)
            value = self._eval(path, values)
            yield name, "missing" if isinstance(value, CELEvalError) else _show(value)

    def _runtime_error(self, err: CELEvalError) -> str:
        tree = err.tree if isinstance(err.tree, LarkTree) else None
        if tree is not None and tree.data == "member_dot":
            name = _field_name(tree)
            if name is not None:
                kind = "capacity" if name.startswith("capacity ") else "attribute"
                return f"{self.where}: {kind} {name.removeprefix('capacity ')} is missing ({self._text(tree)!r})"
        where = f" at {_position(self.expression, tree.meta.start_pos)}" if tree is not None else ""
        return f"{self.where}: CEL runtime error{where}: {_runtime_message(err)}"


def _parse(text: str) -> Tree:
    return _environment().compile(text)


@cache
def _program(text: str) -> celpy.Runner:
    return _environment().program(_parse(text), functions=FUNCTIONS)


def compile_selector(expression: str, where: str) -> Selector:
    """Parses and checks a selector; a syntax or type error raises CelError naming `where`, line and column."""
    if not isinstance(expression, str) or not expression.strip():
        raise CelError(f"{where}: the CEL expression is empty")
    try:
        tree = _parse(expression)
    except CELParseError as err:
        raise CelError(f"{where}: CEL syntax error at {_parse_position(err)}: {_unexpected(err)}") from None
    for offset, message in _type_errors(tree):
        raise CelError(f"{where}: CEL type error at {_position(expression, offset)}: {message}")
    kind = _static_type(tree)
    if kind not in (None, "bool"):
        raise CelError(f"{where}: the CEL expression must return bool, not {kind}")
    return Selector(expression, where, tree)


def _parse_position(err: CELParseError) -> str:
    return f"line {err.line}, column {err.column}" if err.line is not None else "an unknown position"


def _unexpected(err: CELParseError) -> str:
    cause = err.__context__
    if isinstance(cause, lark_exceptions.UnexpectedToken):
        token = cause.token
        return "unexpected end of expression" if token.type == "$END" else f"unexpected {str(token)!r}"
    if isinstance(cause, lark_exceptions.UnexpectedCharacters):
        return f"unexpected character {cause.char!r}"
    return _first_line(err.args[0] if err.args else err)


def _position(expression: str, offset: int) -> str:
    line = expression.count("\n", 0, offset) + 1
    column = offset - (expression.rfind("\n", 0, offset) + 1) + 1
    return f"line {line}, column {column}"


def _runtime_message(err: CELEvalError) -> str:
    """celpy's message without its Python internals: `'=='` for `Token('RULE', 'relation_eq')`, `int` for
    `<class 'celpy.celtypes.IntType'>`."""
    text = _first_line(err.args[0] if err.args else err)
    text = re.sub(r"Token\('RULE', '(relation_\w+)'\)", lambda m: repr(_RELATIONS.get(m[1], m[1])), text)
    return re.sub(r"<class 'celpy\.celtypes\.(\w+?)Type'>", lambda m: m[1].lower(), text)


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else "error"


def _unwrap(node: Node) -> Node:
    while isinstance(node, LarkTree) and node.data in _WRAPPERS and len(node.children) == 1:
        node = node.children[0]
    return node


def _ident(tree: Node) -> str | None:
    node = _unwrap(tree)
    if isinstance(node, LarkTree) and node.data == "ident":
        return str(node.children[0])
    return None


def _string_literal(tree: Node) -> str | None:
    """A plain double-quoted literal's value: domains and attribute names need no escapes."""
    node = _unwrap(tree)
    if isinstance(node, LarkTree) and node.data == "literal" and getattr(node.children[0], "type", "") == "STRING_LIT":
        text = str(node.children[0])
        return text[1:-1] if text.startswith('"') else None
    return None


def _field_name(tree: Node) -> str | None:
    """`device.attributes["d"].x` -> `d/x`; `device.capacity["d"].x` -> `capacity d/x`; `device.driver`."""
    node = _unwrap(tree)
    if not isinstance(node, LarkTree) or node.data != "member_dot":
        return None
    inner, name = node.children
    inner = _unwrap(inner)
    if _ident(inner) == "device":
        return f"device.{name}"
    if isinstance(inner, LarkTree) and inner.data == "member_index":
        container, key = inner.children
        container = _unwrap(container)
        domain = _string_literal(key)
        if (
            domain is not None
            and isinstance(container, LarkTree)
            and container.data == "member_dot"
            and _ident(container.children[0]) == "device"
        ):
            field = str(container.children[1])
            if field == "attributes":
                return f"{domain}/{name}"
            if field == "capacity":
                return f"capacity {domain}/{name}"
    return None


def _device_paths(tree: Node) -> Iterator[Tree]:
    """The outermost `device.…` field selections in an expression, in source order."""
    node = _unwrap(tree)
    if not isinstance(node, LarkTree):
        return
    if _field_name(node) is not None:
        yield node
        return
    for child in node.children:
        if isinstance(child, LarkTree):
            yield from _device_paths(child)


def _show(value: Any) -> str:
    if isinstance(value, celtypes.BoolType):
        return "true" if value else "false"
    if isinstance(value, celtypes.StringType):
        return f'"{value}"'
    return str(value)


def _type_errors(tree: Tree) -> Iterator[tuple[int, str]]:
    """(offset, message) for each mistake Kubernetes' type checker rejects that the syntax alone shows."""
    bound = {"device"} | set(_macro_variables(tree))
    for node in _subtrees(tree):
        if node.data == "member_dot" and _ident(node.children[0]) == "device":
            field = node.children[1]
            if str(field) not in DEVICE_FIELDS:
                message = f"undefined field {str(field)!r} of device (fields: {', '.join(DEVICE_FIELDS)})"
                yield _span(field)[0], message
        elif node.data == "ident" and str(node.children[0]) not in bound:
            yield _span(node)[0], f"undeclared reference to {str(node.children[0])!r}"
        elif node.data in ("ident_arg", "member_dot_arg"):
            name = node.children[0] if node.data == "ident_arg" else node.children[1]
            if node.data == "member_dot_arg" and _ident(node.children[0]) == "cel":
                yield _span(node)[0], f"cel.{name}() is not supported by dra-cpu explain"
            elif str(name) not in _KNOWN_FUNCTIONS:
                yield _span(name)[0], f"undeclared reference to function {str(name)!r}"
    for node, operator, left, right in _relations(tree):
        kinds = (_static_type(left), _static_type(right))
        if None in kinds or kinds[0] == kinds[1] or set(kinds) <= _NUMBERS:
            continue
        yield _span(node)[0], f"found no matching overload for '_{operator}_' applied to '({kinds[0]}, {kinds[1]})'"


def _macro_variables(tree: Tree) -> Iterator[str]:
    for node in _subtrees(tree):
        if node.data == "member_dot_arg" and str(node.children[1]) in _MACROS and len(node.children) == 3:
            args = node.children[2]
            if isinstance(args, LarkTree) and args.children and isinstance(args.children[0], LarkTree):
                name = _ident(args.children[0])
                if name is not None:
                    yield name


def _relations(tree: Tree) -> Iterator[tuple[Tree, str, Node, Node]]:
    """(node, operator, left, right) for each comparison: `relation(relation_eq(left), right)` in celpy's tree."""
    for node in _subtrees(tree):
        if node.data == "relation" and len(node.children) == 2:
            head, right = node.children
            if isinstance(head, LarkTree) and head.data in _RELATIONS and isinstance(right, LarkTree):
                yield node, _RELATIONS[head.data], head.children[0], right


def _static_type(tree: Node) -> str | None:
    """The type of an expression when it is plain from the syntax; None for anything dynamic."""
    node = _unwrap(tree)
    if not isinstance(node, LarkTree):
        return None
    if node.data == "literal":
        token = node.children[0]
        kind = getattr(token, "type", "")
        return {
            "INT_LIT": "int",
            "UINT_LIT": "uint",
            "FLOAT_LIT": "double",
            "STRING_LIT": "string",
            "MLSTRING_LIT": "string",
            "BYTES_LIT": "bytes",
            "BOOL_LIT": "bool",
            "NULL_LIT": "null",
        }.get(kind)
    if node.data == "member_dot" and _ident(node.children[0]) == "device":
        kind = DEVICE_FIELDS.get(str(node.children[1]))
        return None if kind == "map" else kind
    if node.data == "relation" and len(node.children) == 2:
        return "bool"
    if node.data in ("conditionaland", "conditionalor") and len(node.children) == 2:
        return "bool"
    return None


def _subtrees(tree: Tree) -> Iterator[Tree]:
    yield tree
    for child in tree.children:
        if isinstance(child, LarkTree):
            yield from _subtrees(child)


def _span(node: Node) -> tuple[int, int]:
    if isinstance(node, LarkTree):
        return node.meta.start_pos, node.meta.end_pos
    return node.start_pos or 0, node.end_pos or 0
