"""The Dockerfile, built by podman from the local Debian base (hack/testenv/image-base.sh), runs dra-cpu.

The commands inside the image must give the very bytes the installed package gives on the host, for fixture sysfs
trees mounted into the container and for the machine's own /sys; the daemon must get ready inside it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence

import pytest

from tests.harness.paths import FIXTURES, REPO
from tests.harness.runtimes.podman import Podman

BENCH = REPO / "hack" / "bench" / "image.sh"
BASE_SCRIPT = REPO / "hack" / "testenv" / "image-base.sh"


def host_dra_cpu(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dra_cpu", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout


@functools.cache
def build(containers_conf: str) -> subprocess.CompletedProcess[str]:
    """One build per test run (podman's layer cache makes a rebuild quick, but not free)."""
    env = {**os.environ, "CONTAINERS_CONF": containers_conf}
    return subprocess.run(
        ["bash", str(BENCH), "build"], env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.fixture
def image(podman: Podman) -> str:
    base = subprocess.run(["bash", str(BASE_SCRIPT), "name"], capture_output=True, text=True, check=True).stdout
    present = subprocess.run(["podman", "image", "exists", base.strip()], env=podman.env, check=False)
    if present.returncode != 0:
        pytest.skip(f"base image {base.strip()} is missing: run hack/testenv/image-base.sh install")
    built = build(podman.env["CONTAINERS_CONF"])
    assert built.returncode == 0, f"the image did not build:\n{built.stderr[-4000:]}"
    return built.stdout.strip()


def run_in(podman: Podman, image: str, args: Sequence[str], options: Sequence[str] = ()) -> str:
    result = subprocess.run(
        ["podman", "run", "--rm", *options, image, *args],
        env=podman.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("fixture", ["dual-socket-smt2", "snc-4numa"])
def test_discover_and_slices_on_a_mounted_tree(podman: Podman, image: str, fixture: str) -> None:
    tree = FIXTURES / "sysfs" / fixture
    mount = ["-v", f"{tree}:/host:ro"]
    for args in (["discover", "-o", "json"], ["slices", "--node-name", "n"]):
        inside = run_in(podman, image, [*args, "--sysfs-root", "/host"], mount)
        assert inside == host_dra_cpu(*args, "--sysfs-root", str(tree))
    assert len(json.loads(run_in(podman, image, ["discover", "-o", "json", "--sysfs-root", "/host"], mount))["cpus"])


def test_discover_the_machine_itself(podman: Podman, image: str) -> None:
    inside = json.loads(run_in(podman, image, ["discover", "-o", "json"]))
    host = json.loads(host_dra_cpu("discover", "-o", "json"))
    assert [c["id"] for c in inside["cpus"]] == [c["id"] for c in host["cpus"]]
    assert [n["id"] for n in inside["numaNodes"]] == [n["id"] for n in host["numaNodes"]]
    slices = run_in(podman, image, ["slices", "--node-name", "n", "-o", "json"])
    assert json.loads(slices)["items"][0]["spec"]["driver"] == "dra.cpu"


def test_runs_as_an_unprivileged_user_by_default(podman: Podman, image: str) -> None:
    assert run_in(podman, image, ["-u"], ["--entrypoint", "id"]).strip() == "65532"
    assert "dra-cpu" in run_in(podman, image, ["--version"])


def test_the_daemon_gets_ready_in_the_container(podman: Podman, image: str) -> None:
    result = subprocess.run(["bash", str(BENCH)], env=podman.env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    size = re.search(r"image: \S+ from \S+: (\d+) MB", result.stdout)
    ready = re.search(r"start to ready: ([\d.]+) s", result.stdout)
    assert size and ready, result.stdout
    # Generous bounds, to catch a regression by an order of magnitude rather than noise on a shared machine.
    assert 50 < int(size.group(1)) < 600
    assert float(ready.group(1)) < 15
