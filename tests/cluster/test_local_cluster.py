"""`hack/cluster.sh` as a user runs it: `up --numa-guest`, hack/examples applied with kubectl and their pinning read
back inside the pods with `kubectl exec`, `kubectl logs` and `exec` on both nodes, then `down`, which must leave
nothing on this machine (no process, mount, cgroup or interface of the cluster, not its folder).

Everything here goes through the commands a user types: hack/cluster.sh and the kubectl it links; the harness gives
only the guest's topology (GUEST_SPEC), to know which CPUs each NUMA node has, and `leftovers`, to look for what a
cluster could leave behind. The cluster lives in a folder of its own (DRA_CPU_CLUSTER_DIR), beside any cluster a
developer has up.

Cost, warm, on the 2-core test machines while other runs shared them: 527 s for the module (`up --numa-guest` 283 s,
of which 220 s importing the driver's image into the guest and helm; the tests 210 s; `down` 35 s).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dra_cpu.core.cpuset import CPUSet
from tests.harness.cluster.chart import NAMESPACE, RELEASE
from tests.harness.guest.vm import built
from tests.harness.local_cluster.cluster import GUEST_SPEC, ClusterFolder, leftovers
from tests.harness.nodes.guest_kubelet import NODE_NAME as GUEST_NODE
from tests.harness.nodes.real import NODE_NAME as REAL_NODE
from tests.harness.paths import REPO

UP_SECONDS = 1500
"""`up --numa-guest` with a warm cache: the control plane, the real node, the guest's boot and kubelet under TCG, the
image's build and its import into both nodes, helm. The first run on a machine also builds Kubernetes (~16 min)."""
DOWN_SECONDS = 900
RUNNING_SECONDS = 300
"""For a pod of an example to be Ready on the emulated guest of a loaded 2-core machine."""

pytestmark = [pytest.mark.root, pytest.mark.kubelet, pytest.mark.guest, pytest.mark.timeout(UP_SECONDS + 1200)]


def node_cpus(node: int) -> CPUSet:
    return CPUSet.of(next(n.cpus for n in GUEST_SPEC.nodes if n.id == node))


ISOLATED = CPUSet.of(GUEST_SPEC.isolated_cpus)
WIDE = CPUSet.of(GUEST_SPEC.memory_nodes)
"""The cpuset.mems of a claim that asks for no memory: every node with memory, its own preferred (docs/user.md)."""


@dataclass(frozen=True)
class Cluster:
    folder: ClusterFolder
    kubectl: list[str]

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([*self.kubectl, *args], capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}"
        return done.stdout

    def pod_field(self, pod: str, path: str) -> str:
        return self.run("get", "pod", pod, "-o", f"jsonpath={{{path}}}")

    def wait_ready(self, *pods: str) -> None:
        """Until each pod is Ready; when one is not, its description (events, the claim's status) in the failure."""
        for pod in pods:
            done = subprocess.run(
                [*self.kubectl, "wait", "--for=condition=Ready", f"pod/{pod}", f"--timeout={RUNNING_SECONDS}s"],
                capture_output=True, text=True, timeout=RUNNING_SECONDS + 30, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                described = subprocess.run([*self.kubectl, "describe", "pod", pod], capture_output=True, text=True)
                pytest.fail(f"pod {pod} was not Ready in {RUNNING_SECONDS} s:\n{done.stderr}\n{described.stdout}")

    def allowed(self, pod: str) -> tuple[CPUSet, CPUSet]:
        """Cpus_allowed_list and Mems_allowed_list of a process `kubectl exec` starts in the pod's container."""
        status = self.run("exec", pod, "--", "cat", "/proc/self/status")
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        return CPUSet.parse(fields["Cpus_allowed_list"].strip()), CPUSet.parse(fields["Mems_allowed_list"].strip())


def cluster_sh(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "hack" / "cluster.sh"), *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("hack/cluster.sh needs root")
    build, why = built()
    if build is None:
        pytest.skip(why)
    # Short: the nodes' sockets live below it.
    folder = ClusterFolder(Path(tempfile.mkdtemp(prefix="dra-lc-", dir="/tmp")))
    env = {**os.environ, "DRA_CPU_CLUSTER_DIR": str(folder.path)}
    start = time.monotonic()
    up = cluster_sh("up", "--numa-guest", env=env, timeout=UP_SECONDS)
    print(f"hack/cluster.sh up --numa-guest: {time.monotonic() - start:.0f} s\n{up.stdout[-3000:]}")
    try:
        assert up.returncode == 0, f"hack/cluster.sh up failed ({up.returncode}):\n{up.stdout[-6000:]}\n{up.stderr}"
        kubeconfig = cluster_sh("kubeconfig", env=env, timeout=30).stdout.strip()
        assert kubeconfig == str(folder.kubeconfig), "hack/cluster.sh kubeconfig names another file"
        again = cluster_sh("up", "--numa-guest", env=env, timeout=60)
        assert again.returncode == 0 and "already up" in again.stdout, f"a second `up`:\n{again.stdout}"
        yield Cluster(folder, [str(folder.bin / "kubectl"), "--kubeconfig", kubeconfig])
    finally:
        start = time.monotonic()
        down = cluster_sh("down", env=env, timeout=DOWN_SECONDS)
        print(f"hack/cluster.sh down: {time.monotonic() - start:.0f} s\n{down.stdout[-2000:]}")
    assert down.returncode == 0, f"hack/cluster.sh down failed:\n{down.stdout}\n{down.stderr}"
    assert "nothing of it is left" in down.stdout, f"the cluster did not stop cleanly:\n{down.stdout}"
    left = leftovers(folder)
    assert not left, f"left behind after `down`: {left}"
    assert not folder.path.exists(), f"{folder.path} is still there after `down`"


def test_both_nodes_are_ready_with_the_driver_and_its_slices(cluster: Cluster) -> None:
    nodes = cluster.run("get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}{'\\n'}{end}").split()
    assert sorted(nodes) == sorted([REAL_NODE, GUEST_NODE])
    for node in nodes:
        cluster.run("wait", "--for=condition=Ready", f"node/{node}", "--timeout=60s")
    pods = cluster.run(
        "-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}",
        "-o", "jsonpath={range .items[*]}{.spec.nodeName}{'\\n'}{end}",
    ).split()  # fmt: skip
    assert sorted(pods) == sorted(nodes), "one driver pod on each node, by the DaemonSet"
    slices = cluster.run("get", "resourceslices", "-o", "jsonpath={range .items[*]}{.spec.nodeName}{'\\n'}{end}")
    assert set(slices.split()) == set(nodes), f"every node publishes ResourceSlices: {slices.split()}"


def test_claim_split_over_both_numa_nodes_is_pinned_there(cluster: Cluster) -> None:
    """claim-cpu-capacity-20 as written: 10 CPUs of each of the guest's NUMA nodes, read inside the pod."""
    example = str(REPO / "hack" / "examples" / "claim-cpu-capacity-20.yaml")
    cluster.run("apply", "-f", example)
    try:
        cluster.wait_ready("pod-cpu-capacity-20")
        assert cluster.pod_field("pod-cpu-capacity-20", ".spec.nodeName") == GUEST_NODE
        cpus, mems = cluster.allowed("pod-cpu-capacity-20")
        assert len(cpus & node_cpus(0)) == 10 and len(cpus & node_cpus(1)) == 10, f"pinned to {cpus}"
        assert not cpus & ISOLATED, f"an ordinary claim got isolated CPUs: {cpus}"
        assert mems == WIDE, f"memory nodes {mems}"
        logged = cluster.run("logs", "pod-cpu-capacity-20")
        assert f"Cpus_allowed_list:\t{cpus}" in logged, f"the pod's log says otherwise:\n{logged}"
    finally:
        cluster.run("delete", "-f", example, "--wait", timeout=RUNNING_SECONDS)


EXAMPLES = {
    "claim-isolated-cpus.yaml": "pod-dpdk-style",
    "claim-cpu-numa-pinned.yaml": "pod-cpu-numa1",
    "claim-cpu-hugepages-2mi.yaml": "pod-cpu-hugepages-2mi",
    "claim-whole-cores.yaml": "pod-whole-cores",
    "claim-cpu-capacity-4.yaml": "pod-cpu-capacity-4",
}
"""Examples that fit the guest together (16 of its 21 claimable CPUs, the isolated pair, 64 MiB of hugepages), and
the pod each runs."""


def test_examples_run_together_on_the_guest_pinned_as_written(cluster: Cluster) -> None:
    files = [f"--filename={REPO / 'hack' / 'examples' / name}" for name in EXAMPLES]
    cluster.run("apply", *files)
    try:
        cluster.wait_ready(*EXAMPLES.values())
        pinned = {pod: cluster.allowed(pod) for pod in EXAMPLES.values()}
        for pod in EXAMPLES.values():
            assert cluster.pod_field(pod, ".spec.nodeName") == GUEST_NODE, f"{pod} ran elsewhere"
        cpus, _ = pinned["pod-dpdk-style"]
        assert len(cpus) == 2 and cpus.issubset(ISOLATED), f"claim-isolated-cpus got {cpus}"
        cpus, mems = pinned["pod-cpu-numa1"]
        assert len(cpus) == 4 and cpus.issubset(node_cpus(1)) and mems == WIDE, f"NUMA node 1? {cpus} {mems}"
        cpus, mems = pinned["pod-cpu-hugepages-2mi"]
        node = 0 if cpus.issubset(node_cpus(0)) else 1
        assert len(cpus) == 4 and cpus.issubset(node_cpus(node)), f"claim-cpu-hugepages-2mi over NUMA nodes: {cpus}"
        assert mems == WIDE, f"a claim of CPUs and pages only is bound to memory nodes {mems}"
        exclusive = [pinned[pod][0] for pod in EXAMPLES.values()]
        assert sum(map(len, exclusive)) == len(CPUSet.union_all(exclusive)), f"claims share CPUs: {exclusive}"
        for pod in EXAMPLES.values():
            assert not pinned[pod][0] & ISOLATED or pod == "pod-dpdk-style", f"{pod} got isolated CPUs"
    finally:
        cluster.run("delete", *files, "--wait", timeout=RUNNING_SECONDS)


@pytest.mark.parametrize("node", [REAL_NODE, GUEST_NODE])
def test_ordinary_pod_runs_and_answers_exec_and_logs(cluster: Cluster, node: str) -> None:
    """A pod without a claim on each node: on the pod network, with its log and `kubectl exec` reached through the
    node's kubelet; and the driver's own pod's log there."""
    pod = f"hello-{node.replace('.', '-')}"
    overrides = f'{{"apiVersion": "v1", "spec": {{"nodeName": "{node}"}}}}'
    cluster.run(
        "run", pod, "--image=docker.io/library/busybox:1.36", "--restart=Never", f"--overrides={overrides}",
        "--", "sh", "-c", "echo hello from $(hostname); sleep infinity",
    )  # fmt: skip
    try:
        cluster.wait_ready(pod)
        assert cluster.pod_field(pod, ".spec.hostNetwork") != "true" and cluster.pod_field(pod, ".status.podIP")
        assert cluster.run("logs", pod).strip() == f"hello from {pod}"
        assert cluster.run("exec", pod, "--", "cat", "/etc/hostname").strip() == pod
        driver = cluster.run(
            "-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}",
            f"--field-selector=spec.nodeName={node}", "-o", "jsonpath={.items[0].metadata.name}",
        )  # fmt: skip
        assert cluster.run("-n", NAMESPACE, "logs", driver, "--tail=20").strip(), f"{driver} logged nothing"
    finally:
        cluster.run("delete", "pod", pod, "--wait", timeout=RUNNING_SECONDS)
