"""Every parser of outside input ends in a value or a DraCpuError within its time bound, never another exception
or a hang: a hypothesis pass per target (DRA_CPU_FUZZ_EXAMPLES examples each, CI-sized by default) and a replay of
the hostile inputs kept in tests/fuzz/corpus/<target>/. `hack/bench/fuzz.py` runs the same targets longer."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.fuzz_targets import TARGETS, Target, crash

# CI-sized: the whole folder runs in well under two minutes on two cores; hack/bench/fuzz.py runs longer.
EXAMPLES = int(os.environ.get("DRA_CPU_FUZZ_EXAMPLES", "1000"))
CORPUS = [(t, name, value) for t in TARGETS for name, value in t.corpus()]


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_target_never_crashes(target: Target) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # the time bound is crash()'s, per input, which does not flake on a busy machine
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(st.data())
    def check(data: st.DataObject) -> None:
        value = data.draw(target.strategy)
        assert crash(target, value) == "", repr(value)[:500]

    check()


@pytest.mark.parametrize(("target", "name", "value"), CORPUS, ids=[f"{t.name}/{n}" for t, n, _ in CORPUS])
def test_corpus_input_never_crashes(target: Target, name: str, value: Any) -> None:
    assert crash(target, value) == ""


def test_every_target_has_a_corpus() -> None:
    assert {t.name for t, _, _ in CORPUS} == {t.name for t in TARGETS}
