"""Device selectors: compiled with their static checks, evaluated with the reason a device does not match. Pure.

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError
from lark import Tree as LarkTree

from dra_cpu.errors import shown
from dra_cpu.tools.cel.check import (
    RELATIONS,
    device_paths,
    field_name,
    first_line,
    parse_position,
    position,
    span,
    static_type,
    type_errors,
    unexpected,
    unwrap,
)
from dra_cpu.tools.cel.library import (
    MAX_DEPTH,
    MAX_EXPRESSION_LENGTH,
    Budget,
    CelCostError,
    CelDevice,
    CelError,
    Node,
    Tree,
    activation,
    depth,
    evaluate,
    parse,
)


@dataclass(frozen=True)
class Verdict:
    matches: bool
    reason: str = ""
    # A runtime error, such as a missing attribute: the scheduler then stops allocating the whole claim.
    error: bool = False


@dataclass(frozen=True, eq=False)
class Selector:
    """One compiled CEL selector; `where` names it in messages (e.g. `DeviceClass dra.cpu selectors[0]`)."""

    expression: str
    where: str
    tree: Tree

    def evaluate(self, device: CelDevice) -> Verdict:
        """The verdict for one device; the evaluation and its explanation share one cost budget (MAX_COST)."""
        values = activation(device)
        budget = Budget()
        try:
            result = self._eval(self.tree, values, budget)
            if isinstance(result, CELEvalError):
                return Verdict(False, self._runtime_error(result), error=True)
            if not isinstance(result, celtypes.BoolType):
                return Verdict(False, f"{self.where} returned {shown(result)}, not a bool", error=True)
            if result:
                return Verdict(True)
            return Verdict(False, f"{self.where}: {self._why_false(self.tree, values, budget)}")
        except CelCostError as err:
            return Verdict(False, f"{self.where}: CEL runtime error: the expression {err}", error=True)
        except RecursionError:
            return Verdict(False, f"{self.where}: CEL runtime error: the expression nests too deeply", error=True)

    def _eval(self, tree: Node, values: dict[str, Any], budget: Budget) -> Any:
        # Sub-trees are re-parsed from their text: celpy evaluates whole expressions only. Nothing below an
        # `&&` or `||` that we descend into binds a variable, so each such text stands on its own.
        text = self._text(tree)
        try:
            return evaluate(text, values, budget, None if text.strip() or not isinstance(tree, LarkTree) else tree)
        except CELEvalError as err:
            return err
        except CELParseError as err:  # a part's text that does not stand on its own
            return CELEvalError(str(err), type(err), None, tree=tree if isinstance(tree, LarkTree) else None)
        except CelCostError:
            raise
        except Exception as err:  # celpy's own slips (an IndexError from repr of `![]`): the expression's error
            return CELEvalError(str(err), type(err), None, tree=tree if isinstance(tree, LarkTree) else None)

    def _text(self, node: Node) -> str:
        start, end = span(node)
        if start == end and unwrap(node) is unwrap(self.tree):
            return self.expression  # the whole expression, which lark left without a position
        return self.expression[start:end]

    def _why_false(self, tree: Node, values: dict[str, Any], budget: Budget) -> str:
        node = unwrap(tree)
        if isinstance(node, LarkTree) and node.data == "conditionaland" and len(node.children) == 2:
            for child in node.children:
                result = self._eval(child, values, budget)
                if isinstance(result, CELEvalError):
                    return self._runtime_error(result)
                if result is not None and not result:
                    return self._why_false(child, values, budget)
        reads = [f"{name} is {value}" for name, value in self._reads(node, values, budget)]
        # A bare literal operand has no position to take its text from; it is false, so it reads `false`.
        return f"{self._text(node) or 'false'!r} is false" + (f" ({', '.join(reads)})" if reads else "")

    def _reads(self, node: Node, values: dict[str, Any], budget: Budget) -> Iterator[tuple[str, str]]:
        """The device fields an expression reads, named as in the slice, with their values on this device."""
        seen = set()
        for path in device_paths(node):
            name = field_name(path) or self._text(path)
            if name in seen:
                continue
            seen.add(name)
            value = self._eval(path, values, budget)
            yield name, "missing" if isinstance(value, CELEvalError) else show(value)

    def _runtime_error(self, err: CELEvalError) -> str:
        tree = err.tree if isinstance(err.tree, LarkTree) else None
        if tree is not None and tree.data == "member_dot":
            name = field_name(tree)
            if name is not None:
                kind = "capacity" if name.startswith("capacity ") else "attribute"
                return f"{self.where}: {kind} {name.removeprefix('capacity ')} is missing ({self._text(tree)!r})"
        where = f" at {position(self.expression, span(tree)[0])}" if tree is not None else ""
        return f"{self.where}: CEL runtime error{where}: {runtime_message(err)}"


def compile_selector(expression: str, where: str) -> Selector:
    """Parses and checks a selector; a syntax or type error raises CelError naming `where`, line and column."""
    if not isinstance(expression, str) or not expression.strip():
        raise CelError(f"{where}: the CEL expression is empty")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise CelError(
            f"{where}: the CEL expression is {len(expression)} characters long, more than the "
            f"{MAX_EXPRESSION_LENGTH} Kubernetes allows"
        )
    try:
        tree = parse(expression)
    except CELParseError as err:
        raise CelError(f"{where}: CEL syntax error at {parse_position(err)}: {unexpected(err)}") from None
    if depth(tree) > MAX_DEPTH:
        raise CelError(
            f"{where}: the CEL expression nests more than {MAX_DEPTH} levels deep "
            "(each parenthesis, call and chained operator adds levels)"
        )
    try:
        errors = list(type_errors(tree))
    except RecursionError:
        raise CelError(f"{where}: the CEL expression nests too deeply") from None
    for offset, message in errors[:1]:
        raise CelError(f"{where}: CEL type error at {position(expression, offset)}: {message}")
    kind = static_type(tree)
    if kind not in (None, "bool"):
        raise CelError(f"{where}: the CEL expression must return bool, not {kind}")
    return Selector(expression, where, tree)


_OPERATORS = {
    "unary_neg": "-",
    "unary_not": "!",
    "addition_add": "+",
    "addition_sub": "-",
    "multiplication_mul": "*",
    "multiplication_div": "/",
    "multiplication_mod": "%",
}


def runtime_message(err: CELEvalError) -> str:
    """celpy's message without its Python internals: `'=='` for `Token('RULE', 'relation_eq')`, `int` for
    `<class 'celpy.celtypes.IntType'>`."""
    text = first_line(err.args[0] if err.args else err)
    text = re.sub(r"Token\('RULE', '(\w+)'\)", lambda m: repr(RELATIONS.get(m[1], _OPERATORS.get(m[1], m[1]))), text)
    text = text.replace("'relation_in'", "'in'")
    return re.sub(r"<class 'celpy\.celtypes\.(\w+?)Type'>", lambda m: m[1].lower(), text)


def show(value: Any) -> str:
    if isinstance(value, celtypes.BoolType):
        return "true" if value else "false"
    if isinstance(value, celtypes.StringType):
        return f'"{value}"' if len(value) <= 80 else f'"{value[:60]}..." ({len(value)} characters)'
    if isinstance(value, celtypes.ListType):
        text = "[" + ", ".join(show(item) for item in value) + "]"
        return text if len(text) <= 80 else f"{text[:60]}...] ({len(value)} items)"
    text = str(value)
    return text if len(text) <= 80 else shown(value)
