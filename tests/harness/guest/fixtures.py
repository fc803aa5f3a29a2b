"""pytest plugin: the multi-NUMA guest of tests/harness/guest as a fixture.

  guest   the booted `Guest`, shared by the session, without network; powered off at its end. Skips, saying why,
          only where the guest cannot run at all (no qemu, nothing built: run hack/testenv/guest.sh install).

Tests that use it are marked `guest`; the end of the run shows how long the boot and the requests took.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.harness.component import Unavailable
from tests.harness.fixtures import mark_users
from tests.harness.guest.vm import Guest, boot, require_built


@pytest.fixture(scope="session")
def guest(pytestconfig: pytest.Config) -> Iterator[Guest]:
    try:
        build = require_built()
    except Unavailable as err:
        pytest.skip(str(err))
    with boot(build) as booted:
        pytestconfig.stash[_BOOTED] = booted
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        inside = booted.run(["python3", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"])
        if inside.stdout.strip() != host:
            pytest.skip(f"the guest's python is {inside.stdout.strip()}, the host's .venv {host}: it cannot be shared")
        yield booted


_BOOTED = pytest.StashKey[Guest]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_users(items, {"guest"}, pytest.mark.guest)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    booted = config.stash.get(_BOOTED, None)
    if booted is None:
        return
    total = sum(seconds for _, seconds in booted.timings)
    slowest = sorted(booted.timings, key=lambda t: -t[1])[:5]
    terminalreporter.write_sep("-", "test guest")
    terminalreporter.write_line(
        f"booted in {booted.boot_seconds:.1f} s; {len(booted.timings)} requests took {total:.1f} s in the guest"
    )
    for what, seconds in slowest:
        terminalreporter.write_line(f"  {seconds:7.1f} s  {what}")
