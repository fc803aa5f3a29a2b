"""Prepare against the real API server: claims created there, allocations written through the status subresource
as the scheduler writes them, read back by the driver when the kubelet calls."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import kubernetes
import pytest

from dra_cpu.cpuset import CPUSet
from dra_cpu.devices import DeviceMode
from dra_cpu.kube.apiserver import connect
from tests.kubelet_node import cpu_config, result
from tests.testenv_apiserver import ApiServer

GROUP, VERSION, PLURAL = "resource.k8s.io", "v1", "resourceclaims"


@dataclass(frozen=True)
class ServerClaims:
    """Creates the claim, then writes its status the way the scheduler does: through the status subresource.
    kube-apiserver refuses results of requests the claim does not have: a claim written without requests gets one
    per request its allocation names."""

    api: kubernetes.client.CustomObjectsApi

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        body = {k: v for k, v in obj.items() if k != "status"}
        body["metadata"] = {"name": meta["name"], "namespace": meta["namespace"]}
        if not body["spec"]["devices"]["requests"]:
            body["spec"] = copy.deepcopy(body["spec"])
            body["spec"]["devices"]["requests"] = [
                {"name": name, "exactly": {"deviceClassName": "dra.cpu"}} for name in _requests_named(obj["status"])
            ]
        created = self.api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, body)
        created["status"] = copy.deepcopy(obj["status"])
        self.api.replace_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], created
        )
        meta["uid"] = created["metadata"]["uid"]


def _requests_named(status: dict[str, Any]) -> list[str]:
    devices = (status.get("allocation") or {}).get("devices") or {}
    names = [r["request"] for r in devices.get("results", [])]
    names += [n for c in devices.get("config", []) for n in c.get("requests", [])]
    return list(dict.fromkeys(n.split("/")[0] for n in names))


@pytest.fixture
def server_node(node_factory: Any, apiserver: ApiServer, kube_api: Any, kube_namespace: str) -> Any:
    def start(fixture: str = "dual-socket-smt2", mode: DeviceMode = DeviceMode.GROUPED) -> Any:
        claims = ServerClaims(kubernetes.client.CustomObjectsApi(kube_api))
        return node_factory(
            fixture, mode, api=connect(str(apiserver.kubeconfig)), claims=claims, namespace=kube_namespace
        )

    return start


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
    server_node: Any, fixture: str, results: list[dict[str, Any]], expected_cpus: str | None, expected_mems: str
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


def test_whole_cores_config_from_the_server(server_node: Any) -> None:
    node = server_node("multi-l3-per-node")
    ref = node.claim([result("cpu-numa0", cpus=3)], [cpu_config(wholeCores=True)])
    assert "3 CPUs is not a whole number of cores" in node.prepare(ref).error


def test_individual_mode_on_the_server(server_node: Any) -> None:
    node = server_node("big-8numa", DeviceMode.INDIVIDUAL)
    ref = node.claim([result("cpu-5"), result("cpu-6")])
    assert not node.prepare(ref).error
    assert node.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"] == CPUSet.parse("5-6")


def test_deleted_and_recreated_claim_is_refused(server_node: Any, kube_api: Any) -> None:
    from dra_cpu.claims import ClaimRef

    node = server_node()
    ref = node.claim([result("cpu-numa0", cpus=1)])
    stale = ClaimRef(ref.namespace, ref.name, "0000-old-uid")
    assert "the claim was deleted and recreated" in node.kubelet.prepare([stale]).claims[stale.uid].error
    missing = ClaimRef(ref.namespace, "no-such-claim", "u")
    assert node.prepare(missing).error == f"claim {ref.namespace}/no-such-claim not found on the API server"
