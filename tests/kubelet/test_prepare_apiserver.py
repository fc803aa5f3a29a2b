"""Prepare against the real API server: claims created there, allocations written through the status subresource
as the scheduler writes them, read back by the driver when the kubelet calls."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import kubernetes
import pytest

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceMode
from dra_cpu.kube.apiserver import KubeAPI, connect
from tests.harness.claims import NODE, ServerClaims, cpu_config, result
from tests.harness.cluster.client import Kube
from tests.harness.cluster.control_plane import ApiServer
from tests.harness.nodes.standin import NodeFactory, StandinNode
from tests.harness.poll import wait_until


class ServerNodeFactory(Protocol):
    """The `server_node` fixture: a StandinNode whose driver reads its claims from the API server; `cached`: with
    the daemon's cache of the node's pods (kube/pods.py)."""

    def __call__(self, fixture: str = ..., mode: DeviceMode = ..., cached: bool = ...) -> StandinNode: ...


@pytest.fixture
def server_node(
    node_factory: NodeFactory, apiserver: ApiServer, kube_api: kubernetes.client.ApiClient, kube_namespace: str
) -> Iterator[ServerNodeFactory]:
    clients: list[KubeAPI] = []

    def start(
        fixture: str = "dual-socket-smt2", mode: DeviceMode = DeviceMode.GROUPED, cached: bool = False
    ) -> StandinNode:
        claims = ServerClaims(kubernetes.client.CustomObjectsApi(kube_api))
        api = connect(str(apiserver.kubeconfig), node_name=NODE if cached else "")
        clients.append(api)
        if api.pods is not None:
            assert api.pods.listed.wait(10), "the first list of the node's pods"
        return node_factory(fixture, mode, api=api, claims=claims, namespace=kube_namespace)

    yield start
    for api in clients:
        api.close()


@pytest.mark.parametrize(
    ("fixture", "results", "expected_cpus", "expected_mems"),
    [
        ("dual-socket-smt2", [result("cpu-numa1", cpus=4)], "8-11", "1"),
        (
            "multi-l3-per-node",
            [result("cpu-numa0", request="numa0", cpus=10), result("cpu-numa1", request="numa1", cpus=10)],
            None,
            "0-1",
        ),
        (
            "snc-4numa",
            [result("cpu-numa2", cpus=2), result("hugepages-2mi-numa2", request="mem", memory="16Mi")],
            "8-9",
            "2",
        ),
    ],
)
def test_prepare_reads_the_allocation_from_the_server(
    server_node: ServerNodeFactory,
    fixture: str,
    results: list[dict[str, Any]],
    expected_cpus: str | None,
    expected_mems: str,
) -> None:
    node = server_node(fixture)
    ref = node.claim(results)
    response = node.prepare(ref)
    assert not response.error, response.error
    env = node.env(ref.uid)
    if expected_cpus is not None:
        assert env[f"DRA_CPUSET_{ref.uid}"] == CPUSet.parse(expected_cpus)
    else:
        assert len(env[f"DRA_CPUSET_{ref.uid}"]) == 20
    assert env[f"DRA_MEMS_{ref.uid}"] == CPUSet.parse(expected_mems)
    assert env[f"DRA_PODS_{ref.uid}"] == node.pod_uid
    assert node.kubelet.unprepare([ref]).claims[ref.uid].error == ""


def test_whole_cores_config_from_the_server(server_node: ServerNodeFactory) -> None:
    node = server_node("multi-l3-per-node")
    ref = node.claim([result("cpu-numa0", cpus=3)], [cpu_config(wholeCores=True)])
    assert "3 CPUs is not a whole number of cores" in node.prepare(ref).error


def test_individual_mode_on_the_server(server_node: ServerNodeFactory) -> None:
    node = server_node("big-8numa", DeviceMode.INDIVIDUAL)
    ref = node.claim([result("cpu-5"), result("cpu-6")])
    assert not node.prepare(ref).error
    assert node.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"] == CPUSet.parse("5-6")


def test_deleted_and_recreated_claim_is_refused(
    server_node: ServerNodeFactory, kube_api: kubernetes.client.ApiClient
) -> None:
    from dra_cpu.core.claims import ClaimRef

    node = server_node()
    ref = node.claim([result("cpu-numa0", cpus=1)])
    stale = ClaimRef(ref.namespace, ref.name, "00000000-0000-4000-8000-00000000abcd")
    assert "the claim was deleted and recreated" in node.kubelet.prepare([stale]).claims[stale.uid].error
    missing = ClaimRef(ref.namespace, "no-such-claim", "00000000-0000-4000-8000-00000000abce")
    assert node.prepare(missing).error == f"claim {ref.namespace}/no-such-claim not found on the API server"


def _pod(
    kube_api: kubernetes.client.ApiClient,
    node: StandinNode,
    claim: str,
    limits: dict[str, str],
    status: dict[str, Any] | None = None,
) -> None:
    """Create on the server the pod the node's next claim is reserved for: one container using `claim` with
    `limits`, its status merged with `status`, then bound to the node, in the scheduler's order (status in PreBind,
    then the binding)."""
    core = kubernetes.client.CoreV1Api(kube_api)
    name = f"pod-{claim}"
    resources = {"claims": [{"name": "cpus"}], "limits": limits}
    # No controller manager runs against this server to make the namespace's default service account.
    with contextlib.suppress(kubernetes.client.ApiException):
        account = kubernetes.client.V1ServiceAccount.from_dict({"metadata": {"name": "default"}})
        assert account is not None
        core.create_namespaced_service_account(node.namespace, account)
    body = {
        "metadata": {"name": name},
        "spec": {
            "resourceClaims": [{"name": "cpus", "resourceClaimName": claim}],
            "containers": [{"name": "app", "image": "busybox", "resources": resources}],
        },
    }
    pod = kubernetes.client.V1Pod.from_dict(body)
    assert pod is not None
    core.create_namespaced_pod(node.namespace, pod)
    if status:
        core.patch_namespaced_pod_status(name, node.namespace, {"status": status})
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name},
        "target": {"kind": "Node", "name": NODE},
    }
    Kube(kube_api).request("POST", f"/api/v1/namespaces/{node.namespace}/pods/{name}/binding", binding)
    # Read back with the driver's own client, as prepare reads it.
    node.pod_name, node.pod_uid = name, node.driver.api.get_pod(node.namespace, name)["metadata"]["uid"]


@pytest.mark.parametrize("cached", [False, True], ids=["pods-by-get", "pod-cache"])
def test_a_pod_whose_cpu_limit_would_throttle_the_claim_is_refused(
    server_node: ServerNodeFactory, kube_api: kubernetes.client.ApiClient, cached: bool
) -> None:
    """The pod is created (and bound) just before the prepare: with the pod cache, the watch may not have it yet."""
    node = server_node(cached=cached)
    _pod(kube_api, node, "tight", {"cpu": "1500m"})
    ref = node.claim([result("cpu-numa1", cpus=2)], name="tight")
    error = node.prepare(ref).error
    assert error == (
        f"pod {node.namespace}/pod-tight: container 'app' would be CFS-throttled to 1.5 CPUs "
        "(spec.containers[0].resources.limits.cpu 1500m) on the 2 CPUs claim 'tight' pins it to; "
        "raise that limit to at least 2, or remove it"
    )
    # Nothing was pinned: no checkpoint entry, no CDI spec.
    assert ref.uid not in node.driver.reconciler.checkpoint.load().ledger.claims  # type: ignore[union-attr]
    assert not node.driver.reconciler.cdi.path(ref.uid).exists()
    _pod(kube_api, node, "roomy", {"cpu": "2"})
    roomy = node.claim([result("cpu-numa1", cpus=2)], name="roomy")
    assert not node.prepare(roomy).error


def test_a_pod_replaced_under_the_same_name_is_checked_as_the_new_one(
    server_node: ServerNodeFactory, kube_api: kubernetes.client.ApiClient
) -> None:
    """The cache holds the first pod (roomy) when the second (tight) takes its name: the new pod's limit counts."""
    node = server_node(cached=True)
    api = node.driver.api
    assert isinstance(api, KubeAPI) and api.pods is not None
    cache = api.pods
    _pod(kube_api, node, "same", {"cpu": "2"})
    first = node.pod_uid
    wait_until(lambda: cache.get(node.namespace, "pod-same", first) is not None, "the watch to bring the first pod")
    kubernetes.client.CoreV1Api(kube_api).delete_namespaced_pod("pod-same", node.namespace, grace_period_seconds=0)
    _pod(kube_api, node, "same", {"cpu": "1"})
    assert node.pod_uid != first
    ref = node.claim([result("cpu-numa1", cpus=2)], name="same")
    assert "container 'app' would be CFS-throttled to 1 CPU" in node.prepare(ref).error


def test_cpus_mapped_to_node_allocatable_count_on_top_of_the_limit(
    server_node: ServerNodeFactory, kube_api: kubernetes.client.ApiClient
) -> None:
    node = server_node()
    mapped = {
        "nodeAllocatableResourceClaimStatuses": [
            {"resourceClaimName": "mapped", "containers": ["app"], "mapping": [{"name": "cpu", "quantity": "2"}]}
        ]
    }
    _pod(kube_api, node, "mapped", {"cpu": "1m"}, mapped)
    pod = node.driver.api.get_pod(node.namespace, "pod-mapped")
    assert pod["status"]["nodeAllocatableResourceClaimStatuses"][0]["mapping"][0]["quantity"] == "2"
    ref = node.claim([result("cpu-numa1", cpus=2)], name="mapped")
    assert not node.prepare(ref).error


def test_a_pod_whose_memory_may_outgrow_its_strict_claim_is_refused(
    server_node: ServerNodeFactory, kube_api: kubernetes.client.ApiClient
) -> None:
    """dual-socket-smt2: 305Mi of node 0 for claims. A claim of CPUs and 200Mi there binds its container's memory to
    those 200Mi: a memory limit above them, or none, would let it take other claims' memory or be OOM-killed with
    node 1 free; refused, nothing pinned. A CPU-only claim is preferred, not bound: no limit needed."""
    node = server_node()
    claimed = [result("cpu-numa0", cpus=2), result("memory-numa0", "mem", memory="200Mi")]
    _pod(kube_api, node, "greedy", {"memory": "1Gi"})
    greedy = node.claim(claimed, name="greedy")
    assert node.prepare(greedy).error == (
        f"pod {node.namespace}/pod-greedy: container 'app' may use 1Gi of memory "
        "(spec.containers[0].resources.limits.memory 1Gi), more than the 200Mi on NUMA node(s) 0 claim 'greedy' "
        "binds it to; lower that limit to at most 200Mi, or set memoryBinding: preferred in the claim's CPUConfig"
    )
    assert not node.driver.reconciler.cdi.path(greedy.uid).exists()
    assert node.driver.snapshot().ledger.allocated_memory == {}
    _pod(kube_api, node, "unlimited", {"cpu": "2"})
    unlimited = node.claim(claimed, name="unlimited")
    assert "container 'app' has no memory limit, and claim 'unlimited' binds its memory to 200Mi" in (
        node.prepare(unlimited).error
    )
    # Soft on request: the limit may exceed the claim, whose memory is then only preferred.
    _pod(kube_api, node, "soft", {"memory": "1Gi"})
    soft_claimed = [result("cpu-numa0", cpus=2), result("memory-numa0", "mem", memory="100Mi")]
    soft = node.claim(soft_claimed, [cpu_config(memoryBinding="preferred")], name="soft")
    assert not node.prepare(soft).error
    _pod(kube_api, node, "fits", {"memory": "200Mi"})
    fits = node.claim(claimed, name="fits")
    assert not node.prepare(fits).error
    assert node.env(fits.uid)[f"DRA_MEMORY_BINDING_{fits.uid}"] == "strict"
    assert node.driver.snapshot().ledger.allocated_memory == {0: 300 << 20}
    _pod(kube_api, node, "cpus-only", {"cpu": "2"})
    assert not node.prepare(node.claim([result("cpu-numa0", cpus=2)], name="cpus-only")).error
