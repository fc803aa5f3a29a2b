"""CEL selectors are bounded as Kubernetes bounds them: length (10 Ki), nesting, and a cost budget at runtime, so
that a hostile selector ends in one clear error, never a RecursionError or a hang."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from dra_cpu.tools.cel.library import MAX_DEPTH, MAX_EXPRESSION_LENGTH, CelDevice, CelError
from dra_cpu.tools.cel.selector import compile_selector

DEVICE = CelDevice("dra.cpu", {"dra.cpu/numaNodeID": 0}, {"dra.cpu/cpu": Fraction(4)}, True)
HUNDRED = "[" + ",".join(str(i) for i in range(100)) + "]"


def test_an_expression_longer_than_kubernetes_allows_is_refused_before_parsing() -> None:
    with pytest.raises(CelError, match=f"is {MAX_EXPRESSION_LENGTH + 1} characters long, more than the 10240"):
        compile_selector("true" + " " * (MAX_EXPRESSION_LENGTH - 3), "sel")


@pytest.mark.parametrize(
    "expression",
    [
        "(" * 300 + "true" + ")" * 300,
        "&&".join(["true"] * 1500),
        "!" * 3000 + "true",
        "[" * 300 + "]" * 300 + " == []",
        "+".join(["1"] * 2000) + " == 1",
        "".join(f"[1].all(x{i}, " for i in range(60)) + "true" + ")" * 60,
    ],
    ids=["parens", "and-chain", "not-chain", "lists", "sum", "comprehensions"],
)
def test_a_few_kb_of_nesting_is_a_clear_error_not_a_recursion_error(expression: str) -> None:
    assert len(expression) <= MAX_EXPRESSION_LENGTH
    with pytest.raises(CelError, match=f"sel: the CEL expression nests more than {MAX_DEPTH} levels deep"):
        compile_selector(expression, "sel")


def test_nesting_within_the_bound_still_evaluates() -> None:
    assert compile_selector("(" * 20 + "device.driver == 'dra.cpu'" + ")" * 20, "sel").evaluate(DEVICE).matches
    assert compile_selector(" && ".join(["device.driver == 'dra.cpu'"] * 100), "sel").evaluate(DEVICE).matches


@pytest.mark.parametrize(
    "expression",
    [
        f"{HUNDRED}.all(x, {HUNDRED}.all(y, {HUNDRED}.all(z, x + y + z >= 0)))",
        f"{HUNDRED}.map(x, {HUNDRED}.map(y, {HUNDRED}.filter(z, z > x))).size() > 0",
        f"{HUNDRED}.exists(x, {HUNDRED}.exists(y, {HUNDRED}.exists(z, x + y + z < 0)))",
        '["' + "a" * 5000 + '"]' + ".map(s, s + s)" * 40 + ".size() > 0",
    ],
    ids=["all", "map-filter", "exists", "doubling-strings"],
)
def test_a_runaway_selector_ends_with_exceeds_cost_limit(expression: str) -> None:
    selector = compile_selector(expression, "sel")
    started = time.monotonic()
    verdict = selector.evaluate(DEVICE)
    assert time.monotonic() - started < 30
    assert verdict.error and not verdict.matches
    assert verdict.reason == "sel: CEL runtime error: the expression exceeds the cost limit of 1000000"


def test_small_comprehensions_stay_within_the_budget() -> None:
    selector = compile_selector('["a", "b", "dra.cpu"].exists(d, device.driver == d)', "sel")
    assert selector.evaluate(DEVICE).matches


def test_a_type_error_after_a_bare_literal_has_a_position() -> None:
    # Lark gives the tree of `true == ...` no position of its own; the error used to be a TypeError.
    with pytest.raises(CelError, match=r"CEL type error at line 1, column 1: .*'\(bool, string\)'"):
        compile_selector("true == device.driver", "sel")


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("false", "sel: 'false' is false"),
        ("true && false", "sel: 'false' is false"),
        ("!true == true", "sel: '!true == true' is false"),
        (
            "!-true",
            "sel: CEL runtime error at line 1, column 1: found no matching overload for '-' applied to '(bool)'",
        ),
    ],
)
def test_bare_literals_without_positions_are_explained(expression: str, reason: str) -> None:
    # Found by hack/bench/fuzz.py: these used to raise CELParseError or TypeError from explain.
    assert compile_selector(expression, "sel").evaluate(DEVICE).reason == reason


def test_a_slip_inside_celpy_is_the_expression_runtime_error() -> None:
    # Found by hack/bench/fuzz.py: celpy's repr of `![]` raises IndexError while it reports the type error.
    verdict = compile_selector("(![] && ![])", "sel").evaluate(DEVICE)
    assert verdict.error and verdict.reason.startswith("sel: CEL runtime error")


# KEP-5491 list attributes: a CPU device's pcieRoot is a list, a GPU's a string.
CPU = CelDevice("dra.cpu", {"resource.kubernetes.io/pcieRoot": ("pci0000:00", "pci0000:10")}, {}, True)
GPU = CelDevice("gpu.example.com", {"resource.kubernetes.io/pcieRoot": "pci0000:20"}, {}, False)
ROOT = 'device.attributes["resource.kubernetes.io"].pcieRoot'


@pytest.mark.parametrize(
    ("expression", "cpu", "gpu"),
    [
        (f'"pci0000:10" in {ROOT}', True, "error"),
        (f'{ROOT}.includes("pci0000:10")', True, False),
        (f'{ROOT}.includes("pci0000:20")', False, True),
        # Kubernetes cannot iterate a string here (a runtime error); celpy iterates its characters: not compared.
        (f'{ROOT}.exists(r, r.startsWith("pci0000:1"))', True, None),
        (f"size({ROOT}) == 2", True, False),
        (f'{ROOT} == ["pci0000:00", "pci0000:10"]', True, "error"),
        (f'{ROOT} == "pci0000:20"', "error", True),
    ],
)
def test_list_attributes_as_the_kubernetes_cel_environment_has_them(
    expression: str, cpu: bool | str, gpu: bool | str | None
) -> None:
    """`in`, size(), the macros and == work on lists (`in` has no string overload: a runtime error, as in
    Kubernetes); includes() (DRAListTypeAttributes) accepts a list or a scalar alike."""
    selector = compile_selector(expression, "sel")
    for device, want in ((CPU, cpu), (GPU, gpu)):
        if want is None:
            continue
        verdict = selector.evaluate(device)
        assert verdict.error if want == "error" else verdict.matches == want, (device.driver, verdict)


def test_a_false_selector_shows_the_list_it_read() -> None:
    verdict = compile_selector(f'{ROOT}.includes("pci0000:20")', "sel").evaluate(CPU)
    assert verdict.reason.endswith('(resource.kubernetes.io/pcieRoot is ["pci0000:00", "pci0000:10"])')
    verdict = compile_selector(f'"pci0000:10" in {ROOT}', "sel").evaluate(GPU)
    assert verdict.reason == (
        "sel: CEL runtime error at line 1, column 1: found no matching overload for 'in' applied to '(string, string)'"
    )
