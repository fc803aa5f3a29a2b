"""The cdi-hook backend: the pure check of a container's claims, and a real podman + runc container pinned by it."""

from __future__ import annotations

import io
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from dra_cpu import cdihook
from dra_cpu.cli import cdi_hook
from dra_cpu.core import cdi_spec
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import PreparedClaim, PreparedDevice
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.store.cdi_files import CDIStore
from tests.harness.runtimes.cri import Allowed
from tests.harness.runtimes.podman import Podman

SPEC_ENV = {"DRA_CPUSET_u1": "1", "DRA_MEMS_u1": "0", "DRA_PODS_u1": "pod-a,pod-b", "DRA_MEMORY_BINDING_u1": "strict"}


def test_the_pin_trusts_only_the_drivers_spec() -> None:
    specs = {"u1": SPEC_ENV, "u2": None}
    grant, refused = cdihook.pin_for(["PATH=/bin", "DRA_CPUSET_u1=1"], "pod-b", specs)
    assert (grant.cpus, grant.mems, grant.claims, refused) == (CPUSet.of([1]), CPUSet.of([0]), ("u1",), [])
    grant, refused = cdihook.pin_for(["DRA_CPUSET_u1=0-1", "DRA_CPUSET_u2=1"], "pod-b", specs)
    assert not grant.cpus
    assert refused == [
        "claim u1: cpuset '0-1' is not the claim's (1)",
        "claim u2: no such claim is prepared on this node",
    ]
    _, refused = cdihook.pin_for(["DRA_CPUSET_u1=1"], "pod-z", specs)
    assert refused == ["claim u1: pod pod-z is not the pod the claim serves (pod-a, pod-b)"]


def test_the_hook_binds_memory_of_strict_claims_only() -> None:
    """A hook cannot set a memory policy: a claim bound `preferred` (the default without memory, and of every spec
    written before the variable) leaves cpuset.mems as the runtime made it; a strict one, or one with memory, binds."""
    preferred = {k: v for k, v in SPEC_ENV.items() if not k.startswith("DRA_MEMORY_BINDING_")}
    grant, _ = cdihook.pin_for(["DRA_CPUSET_u1=1"], "pod-a", {"u1": preferred})
    assert (grant.cpus, grant.mems) == (CPUSet.of([1]), CPUSet())
    with_memory = {**preferred, "DRA_MEMS_u1": "1", "DRA_MEMORY_u1": "1=1048576"}
    grant, _ = cdihook.pin_for(["DRA_CPUSET_u1=1"], "pod-a", {"u1": with_memory})
    assert (grant.cpus, grant.mems) == (CPUSet.of([1]), CPUSet.of([1]))


def test_bad_stdin_is_a_clear_error_and_exit_1(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert cdi_hook.main(["--cdi-dir", str(tmp_path)], io.StringIO("{not json")) == 1
    assert "cannot read the OCI state on stdin" in caplog.records[-1].__dict__["reason"]
    assert cdi_hook.main(["--cdi-dir", str(tmp_path)], io.StringIO('{"pid": "x"}')) == 1
    assert "has no pid and bundle" in caplog.records[-1].__dict__["reason"]


def test_hook_entry_shape() -> None:
    entry = cdihook.hook("/usr/bin/dra-cpu", cdi_dir=Path("/run/cdi"))
    assert entry == {
        "hookName": "createRuntime",
        "path": "/usr/bin/dra-cpu",
        "args": ["/usr/bin/dra-cpu", "cdi-hook", "--cdi-dir", "/run/cdi", "--driver", "dra.cpu"],
    }


V1_PODMAN_PARENT = Path("/sys/fs/cgroup/cpuset/libpod_parent")


def _repair_v1_parent(parent: Path) -> None:
    """On cgroup v1 an offlined CPU leaves every cpuset for good (the hotplug tests offline CPU 1): give podman's
    parent cgroup the root's CPUs back, as it had when podman made it."""
    if (parent / "cpuset.cpus").exists():
        (parent / "cpuset.cpus").write_text((parent.parent / "cpuset.cpus").read_text())


def test_podman_container_is_pinned_by_the_hook(podman: Podman, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    if cpu == 0:
        pytest.skip("needs a second CPU to tell a pinned container from an unpinned one")
    _repair_v1_parent(V1_PODMAN_PARENT)
    uid = str(uuid.uuid4())
    claim = PreparedClaim(
        ClaimRef("default", "c", uid), (PreparedDevice(("r",), "node", "cpu-numa0", cpus=CPUSet.of([cpu])),)
    ).with_binding(MemoryBinding.STRICT)
    store = CDIStore(tmp_path / "cdi", "dra.cpu")
    hook = cdihook.hook(sys.executable, cdi_dir=store.root, command=("-m", "dra_cpu", "cdi-hook"))
    spec = cdi_spec.build_spec("dra.cpu", claim, CPUSet.of([0]), (hook,))
    store.write(uid, spec)
    podman.write_cdi_spec(spec)

    pinned = podman.run(["cat", "/proc/self/status"], devices=[cdi_spec.device_id("dra.cpu", uid)]).stdout
    assert Allowed.parse(pinned) == Allowed(CPUSet.of([cpu]), CPUSet.of([0]))
    # The same variable written by hand into a container without the spec's hook pins nothing.
    forged = podman.run(["cat", "/proc/self/status"], options=[f"--env=DRA_CPUSET_{uid}={cpu}"]).stdout
    assert Allowed.parse(forged).cpus == CPUSet.of(os.sched_getaffinity(0))
    # A spec the driver does not hold (another claim's uid) is refused by the hook: the container runs unpinned.
    store.remove(uid)
    unpinned = podman.run(["cat", "/proc/self/status"], devices=[cdi_spec.device_id("dra.cpu", uid)]).stdout
    assert Allowed.parse(unpinned).cpus == CPUSet.of(os.sched_getaffinity(0))
    assert json.loads(json.dumps(spec))["devices"][0]["containerEdits"]["hooks"] == [hook]
