"""What every pytest fixture of the harness does with a piece (tests/harness/component.py): start it, skip the test
when the piece cannot run here, fail it (with the piece's own message, not a traceback) when the piece does not
start, and stop it afterwards. The fixtures themselves live in each sub-package's fixtures.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import pytest

from tests.harness.component import Component, Unavailable

C = TypeVar("C", bound=Component)


@contextlib.contextmanager
def started(component: C, what: str, fails_on: tuple[type[Exception], ...] = ()) -> Iterator[C]:
    """`component`, started, for the body of the `with`; stopped at its end."""
    failure = ""
    try:
        component.start()
    except Unavailable as err:
        component.stop()
        pytest.skip(str(err))
    except fails_on as err:
        component.stop()
        failure = str(err)
    if failure:
        pytest.fail(f"{what} did not start: {failure}", pytrace=False)
    try:
        yield component
    finally:
        component.stop()


def mark_users(items: list[pytest.Item], fixtures: set[str], mark: pytest.MarkDecorator) -> None:
    """Marks every test that uses one of `fixtures`, however it gets there, so that `-m "not <mark>"` leaves it out."""
    for item in items:
        if fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(mark)
