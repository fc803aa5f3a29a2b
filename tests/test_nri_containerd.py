"""The NRI plugin against a real containerd (2.1 and 1.7): cpusets read back inside the containers and on the host.

Prepares run in-process through the Driver with a claim folder (StandaloneAPI); containers get the claim's CDI
device through CRI the way kubelet passes it. The machine may have only 2 CPUs: one claimed, one shared.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from cri import Container, CriClient, Pod
from testenv_containerd import SCRIPT, Containerd

from dra_cpu import cdi
from dra_cpu.cdi import CDIStore
from dra_cpu.checkpoint import CheckpointFile
from dra_cpu.claims import ClaimRef
from dra_cpu.cpuset import CPUSet
from dra_cpu.devices import DeviceConfig, build_devices
from dra_cpu.driver import Driver
from dra_cpu.errors import DraCpuError
from dra_cpu.kube.standalone import StandaloneAPI
from dra_cpu.nri.plugin import NriConfig, NriPlugin
from dra_cpu.sysfs import read_topology
from tests.waiting import eventually

NODE = "node-nri"
ONLINE = CPUSet.parse(Path("/sys/devices/system/cpu/online").read_text())


@dataclass
class Node:
    """A driver with its NRI plugin, connected to a containerd."""

    containerd: Containerd
    driver: Driver
    plugin: NriPlugin
    claims_dir: Path

    @property
    def cri(self) -> CriClient:
        return self.containerd.cri

    def new_plugin(self, grace_seconds: float = 10.0) -> NriPlugin:
        plugin = NriPlugin(
            NriConfig(socket=self.containerd.nri_socket, backoff_max=0.3, grace_seconds=grace_seconds),
            self.driver.topology,
            self.driver.state,
        )
        self.driver.enforcer = plugin
        plugin.start()
        assert plugin.wait_ready(10), "the plugin never synchronized with containerd"
        self.plugin = plugin
        return plugin

    def claim(self, pod_uids: list[str], cpus: int = 1) -> ClaimRef:
        """Write an allocated claim reserved for `pod_uids` and prepare it."""
        ref = ClaimRef("default", f"claim-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
        obj = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid},
            "status": {
                "allocation": {
                    "devices": {
                        "results": [
                            {
                                "request": "cpus",
                                "driver": "dra.cpu",
                                "pool": NODE,
                                "device": "cpu-numa0",
                                "consumedCapacity": {"dra.cpu/cpu": str(cpus)},
                            }
                        ]
                    }
                },
                "reservedFor": [{"resource": "pods", "name": "p", "uid": uid} for uid in pod_uids],
            },
        }
        path = self.claims_dir / "resourceclaims" / ref.namespace / f"{ref.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj))
        result = self.driver.prepare([ref])[ref.uid]
        assert result.claim is not None, result.error
        return ref

    def cpus_of(self, ref: ClaimRef) -> CPUSet:
        return self.driver.state.claims[ref.uid].cpus

    def claimed_container(self, pod: Pod, ref: ClaimRef, name: str = "pinned") -> Container:
        return self.cri.create_container(pod, name, cdi_devices=[cdi.device_id("dra.cpu", ref.uid)])

    def shared(self) -> CPUSet:
        return self.driver.state.shared_cpus(self.driver.topology)

    def assert_allowed(self, container: Container, cpus: CPUSet, mems: CPUSet | None = None) -> None:
        """Inside (a new process in the container) and on the host (its init process) agree on cpus (and mems)."""

        def check() -> object:
            inside, host = self.cri.allowed_inside(container), self.cri.allowed_on_host(container)
            if inside.cpus == host.cpus == cpus and (mems is None or inside.mems == host.mems == mems):
                return True
            return (inside, host)

        eventually(check, f"{container.name} should run on {cpus}")


@pytest.fixture
def node(containerd: Containerd, tmp_path: Path) -> Iterator[Node]:
    yield from _node(containerd, tmp_path)


@pytest.fixture
def fresh_node(fresh_containerd: Containerd, tmp_path: Path) -> Iterator[Node]:
    yield from _node(fresh_containerd, tmp_path)


def _node(containerd: Containerd, tmp_path: Path, min_shared_cpus: int = 1) -> Iterator[Node]:
    if len(ONLINE) < 2:
        pytest.skip("needs at least 2 online CPUs: one to claim, one to share")
    topology = read_topology("/")
    config = DeviceConfig(node_name=NODE)
    driver = Driver(
        api=StandaloneAPI(tmp_path / "cluster"),
        config=config,
        topology=topology,
        devices=build_devices(topology, config),
        checkpoint=CheckpointFile(tmp_path / "checkpoint"),
        cdi_store=CDIStore(containerd.cdi_dir, config.driver_name),
        boot_id="test-boot",
        min_shared_cpus=min_shared_cpus,
    )
    (tmp_path / "checkpoint").mkdir(parents=True)
    driver.start()
    node = Node(containerd, driver, None, tmp_path / "cluster")  # type: ignore[arg-type]
    node.new_plugin()
    yield node
    node.plugin.stop()


def test_claimed_container_pinned_and_shared_pool_follows_claims(node: Node) -> None:
    cri = node.cri
    bystander = cri.create_container(cri.run_pod("bystander"), "plain")
    node.assert_allowed(bystander, ONLINE)

    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    claimed = node.cpus_of(ref)
    assert len(claimed) == 1
    # Prepare shrinks the running bystander at once, before any container of the claim exists.
    node.assert_allowed(bystander, ONLINE - claimed)

    pinned = node.claimed_container(pod, ref)
    node.assert_allowed(pinned, claimed, mems=node.driver.topology.numa_nodes_of(claimed))
    env = cri.exec_sync(pinned, ["env"]).stdout.splitlines()
    assert f"DRA_CPUSET_{ref.uid}={claimed}" in env
    # A container of the same pod without the claim's device is shared.
    sidecar = cri.create_container(pod, "sidecar")
    node.assert_allowed(sidecar, ONLINE - claimed)

    cri.remove_pod(pod)
    assert node.driver.unprepare([ref]) == {ref.uid: ""}
    node.assert_allowed(bystander, ONLINE)


def test_forged_env_gets_the_shared_pool_and_is_counted(node: Node) -> None:
    cri = node.cri
    owner = cri.run_pod("owner", uid=str(uuid.uuid4()))
    ref = node.claim([owner.uid])
    claimed = node.cpus_of(ref)
    forger = cri.run_pod("forger")
    before = node.plugin.forged_env_total

    forged = cri.create_container(forger, "forged", env={f"DRA_CPUSET_{ref.uid}": str(claimed)})
    node.assert_allowed(forged, ONLINE - claimed)
    assert node.plugin.forged_env_total == before + 1
    # The right pod with the wrong cpuset in its env is no better.
    wrong = str(ONLINE - claimed)
    mismatched = cri.create_container(owner, "mismatched", env={f"DRA_CPUSET_{ref.uid}": wrong})
    node.assert_allowed(mismatched, ONLINE - claimed)
    assert node.plugin.forged_env_total == before + 2


def test_someone_elses_update_does_not_unpin(node: Node) -> None:
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    pinned = node.claimed_container(pod, ref)
    plain = cri.create_container(pod, "plain")
    node.assert_allowed(pinned, node.cpus_of(ref))

    cri.update_resources(pinned, cpuset_cpus=str(ONLINE))
    cri.update_resources(plain, cpuset_cpus=str(ONLINE))
    node.assert_allowed(pinned, node.cpus_of(ref))
    node.assert_allowed(plain, node.shared())


def test_plugin_restart_keeps_pins_and_reconciles(node: Node) -> None:
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    pinned = node.claimed_container(pod, ref)
    node.assert_allowed(pinned, node.cpus_of(ref))

    node.plugin.stop()
    # While no plugin is connected the runtime creates containers unpinned ...
    missed = cri.create_container(cri.run_pod("while-down"), "missed")
    node.assert_allowed(missed, ONLINE)
    node.assert_allowed(pinned, node.cpus_of(ref))

    node.new_plugin()
    # ... and Synchronize puts them on the shared pool; the pinned one stays pinned.
    node.assert_allowed(missed, ONLINE - node.cpus_of(ref))
    node.assert_allowed(pinned, node.cpus_of(ref))


def _restart_containerd(daemon: Containerd) -> None:
    pid = int((daemon.dir / "containerd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    eventually(lambda: not Path(f"/proc/{pid}").exists() or "zombie", "containerd should exit")
    subprocess.run(["bash", str(SCRIPT), "start", daemon.version, str(daemon.dir)], check=True, capture_output=True)


def test_containerd_restart_reconnects_and_resynchronizes(fresh_node: Node) -> None:
    node = fresh_node
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    first = node.claim([pod.uid])
    pinned = node.claimed_container(pod, first)
    plain = cri.create_container(cri.run_pod("plain"), "plain")
    node.assert_allowed(plain, ONLINE - node.cpus_of(first))

    _restart_containerd(node.containerd)
    assert node.plugin.wait_ready(15), "the plugin did not reconnect to the restarted containerd"
    assert node.plugin.connects_total == 2
    node.assert_allowed(pinned, node.cpus_of(first))
    # The reconnected plugin still follows claims: unprepare regrows the running container.
    cri.remove_pod(pod)
    assert node.driver.unprepare([first]) == {first.uid: ""}
    node.assert_allowed(plain, ONLINE)


def test_enforcement_down_fails_prepares_after_the_grace_period(fresh_node: Node) -> None:
    node = fresh_node
    node.plugin.stop()
    node.new_plugin(grace_seconds=0.0)
    os.kill(int((node.containerd.dir / "containerd.pid").read_text()), signal.SIGKILL)
    eventually(lambda: not node.plugin.ready.is_set(), "the plugin should notice the runtime is gone")
    with pytest.raises(DraCpuError, match="not enforced"):
        node.plugin.check_ready()
    ref = ClaimRef("default", "late", str(uuid.uuid4()))
    assert "not enforced" in node.driver.prepare([ref])[ref.uid].error


def test_two_claims_never_overlap_and_an_empty_shared_pool_refuses_containers(
    containerd: Containerd, tmp_path: Path
) -> None:
    nodes = _node(containerd, tmp_path, min_shared_cpus=0)
    node = next(nodes)
    try:
        cri = node.cri
        pods = [cri.run_pod(f"claimant-{i}", uid=str(uuid.uuid4())) for i in range(len(ONLINE))]
        refs = [node.claim([pod.uid]) for pod in pods]
        cpus = [node.cpus_of(ref) for ref in refs]
        assert CPUSet.union_all(cpus) == ONLINE and sum(map(len, cpus)) == len(ONLINE)
        for pod, ref, mine in zip(pods, refs, cpus, strict=True):
            node.assert_allowed(node.claimed_container(pod, ref), mine)
        with pytest.raises(grpc.RpcError, match="no shared CPU"):
            cri.create_container(pods[0], "unclaimed")
    finally:
        next(nodes, None)
