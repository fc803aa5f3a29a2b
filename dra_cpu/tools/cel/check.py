"""What Kubernetes' CEL type checker rejects that the parse tree alone shows, with line and column; and the tree
walks the explanations share. celpy has no type checker of its own. Pure."""

from __future__ import annotations

from collections.abc import Iterator

from celpy.celparser import CELParseError
from lark import Token
from lark import Tree as LarkTree
from lark import exceptions as lark_exceptions

from dra_cpu.tools.cel.library import DEVICE_FIELDS, KNOWN_FUNCTIONS, MACROS, Node, Tree

WRAPPERS = {
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
RELATIONS = {
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
}
NUMBERS = {"int", "uint", "double"}


def parse_position(err: CELParseError) -> str:
    return f"line {err.line}, column {err.column}" if err.line is not None else "an unknown position"


def unexpected(err: CELParseError) -> str:
    cause = err.__context__
    if isinstance(cause, lark_exceptions.UnexpectedToken):
        token = cause.token
        return "unexpected end of expression" if token.type == "$END" else f"unexpected {str(token)!r}"
    if isinstance(cause, lark_exceptions.UnexpectedCharacters):
        return f"unexpected character {cause.char!r}"
    return first_line(err.args[0] if err.args else err)


def position(expression: str, offset: int) -> str:
    line = expression.count("\n", 0, offset) + 1
    column = offset - (expression.rfind("\n", 0, offset) + 1) + 1
    return f"line {line}, column {column}"


def unwrap(node: Node) -> Node:
    while isinstance(node, LarkTree) and node.data in WRAPPERS and len(node.children) == 1:
        node = node.children[0]
    return node


def ident(tree: Node) -> str | None:
    node = unwrap(tree)
    if isinstance(node, LarkTree) and node.data == "ident":
        return str(node.children[0])
    return None


def string_literal(tree: Node) -> str | None:
    """A plain double-quoted literal's value: domains and attribute names need no escapes."""
    node = unwrap(tree)
    if isinstance(node, LarkTree) and node.data == "literal" and getattr(node.children[0], "type", "") == "STRING_LIT":
        text = str(node.children[0])
        return text[1:-1] if text.startswith('"') else None
    return None


def field_name(tree: Node) -> str | None:
    """`device.attributes["d"].x` -> `d/x`; `device.capacity["d"].x` -> `capacity d/x`; `device.driver`."""
    node = unwrap(tree)
    if not isinstance(node, LarkTree) or node.data != "member_dot":
        return None
    inner, name = node.children
    inner = unwrap(inner)
    if ident(inner) == "device":
        return f"device.{name}"
    if isinstance(inner, LarkTree) and inner.data == "member_index":
        container, key = inner.children
        container = unwrap(container)
        domain = string_literal(key)
        if (
            domain is not None
            and isinstance(container, LarkTree)
            and container.data == "member_dot"
            and ident(container.children[0]) == "device"
        ):
            field = str(container.children[1])
            if field == "attributes":
                return f"{domain}/{name}"
            if field == "capacity":
                return f"capacity {domain}/{name}"
    return None


def device_paths(tree: Node) -> Iterator[Tree]:
    """The outermost `device.…` field selections in an expression, in source order."""
    node = unwrap(tree)
    if not isinstance(node, LarkTree):
        return
    if field_name(node) is not None:
        yield node
        return
    for child in node.children:
        if isinstance(child, LarkTree):
            yield from device_paths(child)


def type_errors(tree: Tree) -> Iterator[tuple[int, str]]:
    """(offset, message) for each mistake Kubernetes' type checker rejects that the syntax alone shows."""
    bound = {"device"} | set(macro_variables(tree))
    for node in subtrees(tree):
        if node.data == "member_dot" and ident(node.children[0]) == "device":
            field = node.children[1]
            if str(field) not in DEVICE_FIELDS:
                message = f"undefined field {str(field)!r} of device (fields: {', '.join(DEVICE_FIELDS)})"
                yield span(field)[0], message
        elif node.data == "ident" and str(node.children[0]) not in bound:
            yield span(node)[0], f"undeclared reference to {str(node.children[0])!r}"
        elif node.data in ("ident_arg", "member_dot_arg"):
            name = node.children[0] if node.data == "ident_arg" else node.children[1]
            if node.data == "member_dot_arg" and ident(node.children[0]) == "cel":
                yield span(node)[0], f"cel.{name}() is not supported by dra-cpu explain"
            elif str(name) not in KNOWN_FUNCTIONS:
                yield span(name)[0], f"undeclared reference to function {str(name)!r}"
    for node, operator, left, right in relations(tree):
        kinds = (static_type(left), static_type(right))
        if None in kinds or kinds[0] == kinds[1] or set(kinds) <= NUMBERS:
            continue
        yield span(node)[0], f"found no matching overload for '_{operator}_' applied to '({kinds[0]}, {kinds[1]})'"


def macro_variables(tree: Tree) -> Iterator[str]:
    for node in subtrees(tree):
        if node.data == "member_dot_arg" and str(node.children[1]) in MACROS and len(node.children) == 3:
            args = node.children[2]
            if isinstance(args, LarkTree) and args.children and isinstance(args.children[0], LarkTree):
                name = ident(args.children[0])
                if name is not None:
                    yield name


def relations(tree: Tree) -> Iterator[tuple[Tree, str, Node, Node]]:
    """(node, operator, left, right) for each comparison: `relation(relation_eq(left), right)` in celpy's tree."""
    for node in subtrees(tree):
        if node.data == "relation" and len(node.children) == 2:
            head, right = node.children
            if isinstance(head, LarkTree) and head.data in RELATIONS and isinstance(right, LarkTree):
                yield node, RELATIONS[head.data], head.children[0], right


def static_type(tree: Node) -> str | None:
    """The type of an expression when it is plain from the syntax; None for anything dynamic."""
    node = unwrap(tree)
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
    if node.data == "member_dot" and ident(node.children[0]) == "device":
        kind = DEVICE_FIELDS.get(str(node.children[1]))
        return None if kind == "map" else kind
    if node.data == "relation" and len(node.children) == 2:
        return "bool"
    if node.data in ("conditionaland", "conditionalor") and len(node.children) == 2:
        return "bool"
    return None


def subtrees(tree: Tree) -> Iterator[Tree]:
    yield tree
    for child in tree.children:
        if isinstance(child, LarkTree):
            yield from subtrees(child)


def span(node: Node) -> tuple[int, int]:
    if isinstance(node, LarkTree):
        start, end = getattr(node.meta, "start_pos", None), getattr(node.meta, "end_pos", None)
        if start is not None and end is not None:
            return start, end
        # Lark leaves the positions of a tree whose first child is an anonymous token (`true`) empty: its tokens
        # still have them.
        positions = [span(token) for token in node.scan_values(lambda v: isinstance(v, Token))]
        return (min(p[0] for p in positions), max(p[1] for p in positions)) if positions else (0, 0)
    return node.start_pos or 0, node.end_pos or 0


def first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else "error"
