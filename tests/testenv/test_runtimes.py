"""The container runtimes of the test environment do what dra-cpu relies on: CDI env edits reach the container, and
the cpuset a container runs with can be read back from inside it and from the host."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from dra_cpu.core.cpuset import CPUSet
from tests.harness.runtimes.containerd import Containerd
from tests.harness.runtimes.cri import Allowed
from tests.harness.runtimes.podman import Podman

KIND = "dra.cpu/cpu"


def env_spec(envs: dict[str, str]) -> dict[str, object]:
    """A CDI spec of kind dra.cpu/cpu with one device per key, whose only edit is that env entry (cdiVersion 0.5.0:
    the newest that containerd 1.7, 2.x and podman 4.3 all accept)."""
    return {
        "cdiVersion": "0.5.0",
        "kind": KIND,
        "devices": [{"name": name, "containerEdits": {"env": [env]}} for name, env in envs.items()],
    }


def last_cpu() -> int:
    return max(os.sched_getaffinity(0))


def test_containerd_cdi_env_and_cpuset(containerd: Containerd) -> None:
    by_field, by_annotation = f"claim-{uuid.uuid4()}", f"claim-{uuid.uuid4()}"
    containerd.write_cdi_spec(
        f"dra.cpu-cpu_{by_field}",
        env_spec({by_field: "DRA_CPU_FIELD=from-cdi-field", by_annotation: "DRA_CPU_ANNOTATION=from-annotation"}),
    )
    cri = containerd.cri
    pod = cri.run_pod("cdi", namespace="testenv")
    pinned = str(last_cpu())
    container = cri.create_container(
        pod,
        "pinned",
        env={"FROM_CRI": "yes"},
        cdi_devices=[f"{KIND}={by_field}"],
        annotations={f"cdi.k8s.io/{by_annotation}": f"{KIND}={by_annotation}"},
        cpuset_cpus=pinned,
    )

    env = cri.exec_sync(container, ["env"]).stdout.splitlines()
    assert {"FROM_CRI=yes", "DRA_CPU_FIELD=from-cdi-field", "DRA_CPU_ANNOTATION=from-annotation"} <= set(env)
    inside, host = cri.allowed_inside(container), cri.allowed_on_host(container)
    assert inside.cpus == host.cpus == CPUSet.parse(pinned)
    assert inside.mems == host.mems == Allowed.of_pid(os.getpid()).mems
    assert cri.status(container).state == 1  # CONTAINER_RUNNING


def test_containerd_unpinned_container_gets_every_cpu(containerd: Containerd) -> None:
    cri = containerd.cri
    container = cri.create_container(cri.run_pod("unpinned"), "plain")
    inside = cri.allowed_inside(container)
    assert inside == cri.allowed_on_host(container)
    assert inside.cpus == CPUSet.parse(Path("/sys/devices/system/cpu/online").read_text())


def test_podman_cdi_env_and_cpuset(podman: Podman) -> None:
    device = f"claim-{uuid.uuid4()}"
    podman.write_cdi_spec(env_spec({device: "DRA_CPU_PODMAN=from-cdi"}))
    pinned = str(last_cpu())

    env = podman.run(["env"], devices=[f"{KIND}={device}"]).stdout.splitlines()
    assert "DRA_CPU_PODMAN=from-cdi" in env
    status = podman.run(["cat", "/proc/self/status"], options=[f"--cpuset-cpus={pinned}"]).stdout
    assert Allowed.parse(status).cpus == CPUSet.parse(pinned)
