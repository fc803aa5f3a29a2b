"""dra-cpu status (and explain --kubeconfig) against the real API server stand-in: the test publishes the slices
dra-cpu builds from real-kernel captures, creates claims and writes their allocation through the status subresource."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from dra_cpu.cli import main
from dra_cpu.core.devices import DeviceConfig, GroupBy, build_devices, build_slices
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.explain.parse import parse_slices, parse_usage
from dra_cpu.tools.status import cluster_status, render_table
from tests.harness.cluster.control_plane import ApiServer
from tests.harness.paths import FIXTURES
from tests.harness.typed import as_dict

GROUP, VERSION = "resource.k8s.io", "v1"


def slices_for(fixture: str, node: str, driver: str) -> list[dict[str, Any]]:
    config = DeviceConfig(node_name=node, driver_name=driver)
    return build_slices(build_devices(read_topology(FIXTURES / "sysfs" / fixture), config), config)


def claim(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"devices": {"requests": [{"name": "r", "exactly": {"deviceClassName": "dra.cpu"}}]}},
    }


def results(driver: str, node: str, *held: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [
        {"request": "r", "driver": driver, "pool": node, "device": device, "consumedCapacity": {key: amount}}
        for device, key, amount in held
    ]


def allocate(objects: client.CustomObjectsApi, obj: dict[str, Any], allocated: list[dict[str, Any]]) -> None:
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    created = as_dict(objects.create_namespaced_custom_object(GROUP, VERSION, namespace, "resourceclaims", obj))
    created["status"] = {"allocation": {"devices": {"results": allocated}}}
    objects.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, "resourceclaims", name, created)


def test_status_pure_counts_what_claims_consumed() -> None:
    slices = slices_for("dual-socket-smt2", "n", "dra.cpu")
    in_use = [
        {
            "kind": "ResourceClaim",
            "metadata": {"name": "a", "namespace": "ns"},
            "status": {
                "allocation": {
                    "devices": {
                        "results": results(
                            "dra.cpu",
                            "n",
                            ("cpu-numa1", "dra.cpu/cpu", "3"),
                            ("hugepages-2mi-numa1", "memory", "32Mi"),
                            ("memory-numa1", "dra.cpu/memory", "100Mi"),
                        )
                    }
                }
            },
        }
    ]
    rows = cluster_status(parse_slices(slices, "s"), parse_usage(in_use, "c"), "dra.cpu")
    assert [r.as_dict() for r in rows] == [
        {
            "node": "n",
            "numaNode": 0,
            # CPU 0 is held back for containers without claims (minSharedCpus 1): not published.
            "cpus": {"total": 7, "allocated": 0, "free": 7},
            "isolatedCpus": {"total": 0, "allocated": 0, "free": 0},
            "memory": {"total": "305Mi", "allocated": "0", "free": "305Mi"},
            "hugepages": {"2Mi": {"total": "128Mi", "allocated": "0", "free": "128Mi"}},
            "claims": [],
        },
        {
            "node": "n",
            "numaNode": 1,
            "cpus": {"total": 8, "allocated": 3, "free": 5},
            "isolatedCpus": {"total": 0, "allocated": 0, "free": 0},
            "memory": {"total": "412Mi", "allocated": "100Mi", "free": "312Mi"},
            "hugepages": {"2Mi": {"total": "64Mi", "allocated": "32Mi", "free": "32Mi"}},
            "claims": [
                {"claim": "ns/a", "device": "cpu-numa1", "holds": "3 CPU(s)"},
                {"claim": "ns/a", "device": "hugepages-2mi-numa1", "holds": "32Mi of 2Mi hugepages"},
                {"claim": "ns/a", "device": "memory-numa1", "holds": "100Mi of memory"},
            ],
        },
    ]


@pytest.fixture
def cluster(apiserver: ApiServer, kube_api: client.ApiClient, kube_namespace: str) -> dict[str, str]:
    """Two nodes of a driver no other test uses, with three allocated claims and one pending."""
    tag = uuid.uuid4().hex[:8]
    driver, big, small = f"cpu-{tag}.example.com", f"big-{tag}", f"small-{tag}"
    objects = client.CustomObjectsApi(kube_api)
    for obj in slices_for("dual-socket-smt2", big, driver) + slices_for("snc-4numa", small, driver):
        objects.create_cluster_custom_object(GROUP, VERSION, "resourceslices", obj)
    allocate(objects, claim("web", kube_namespace), results(driver, big, ("cpu-numa0", f"{driver}/cpu", "5")))
    allocate(
        objects,
        claim("db", kube_namespace),
        results(
            driver,
            big,
            ("cpu-numa0", f"{driver}/cpu", "2"),
            ("hugepages-2mi-numa0", f"{driver}/memory", "64Mi"),
            ("memory-numa0", f"{driver}/memory", "200Mi"),
        ),
    )
    allocate(objects, claim("tiny", kube_namespace), results(driver, small, ("cpu-numa3", f"{driver}/cpu", "4")))
    objects.create_namespaced_custom_object(
        GROUP, VERSION, kube_namespace, "resourceclaims", claim("pending", kube_namespace)
    )
    device_class = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": f"cpus-{tag}"},
        "spec": {
            "selectors": [
                {"cel": {"expression": f'device.driver == "{driver}"'}},
                {"cel": {"expression": f'device.attributes["{driver}"].type == "cpu"'}},
            ]
        },
    }
    objects.create_cluster_custom_object(GROUP, VERSION, "deviceclasses", device_class)
    return {
        "kubeconfig": str(apiserver.kubeconfig),
        "driver": driver,
        "big": big,
        "small": small,
        "class": f"cpus-{tag}",
        "ns": kube_namespace,
    }


def test_status_against_the_api_server(cluster: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["status", "--kubeconfig", cluster["kubeconfig"], "--driver-name", cluster["driver"]]
    assert main([*base, "--node", cluster["big"], "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["numaNodes"]
    ns = cluster["ns"]
    assert [(r["numaNode"], r["cpus"], r["hugepages"], r["memory"]) for r in rows] == [
        (
            0,
            {"total": 7, "allocated": 7, "free": 0},
            {"2Mi": {"total": "128Mi", "allocated": "64Mi", "free": "64Mi"}},
            {"total": "305Mi", "allocated": "200Mi", "free": "105Mi"},
        ),
        (
            1,
            {"total": 8, "allocated": 0, "free": 8},
            {"2Mi": {"total": "64Mi", "allocated": "0", "free": "64Mi"}},
            {"total": "412Mi", "allocated": "0", "free": "412Mi"},
        ),
    ]
    assert sorted((h["claim"], h["holds"]) for h in rows[0]["claims"]) == [
        (f"{ns}/db", "2 CPU(s)"),
        (f"{ns}/db", "200Mi of memory"),
        (f"{ns}/db", "64Mi of 2Mi hugepages"),
        (f"{ns}/web", "5 CPU(s)"),
    ]

    assert main(base) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "NODE",
        "NUMA",
        "CPUS",
        "ALLOC",
        "FREE",
        "ISOLATED(A/T)",
        "MEMORY(A/T)",
        "HUGEPAGES(A/T)",
        "CLAIMS",
    ]
    mine = [line.split()[:5] for line in table[1:] if line.split()[0] in (cluster["big"], cluster["small"])]
    assert mine == [
        [cluster["big"], "0", "7", "7", "0"],
        [cluster["big"], "1", "8", "0", "8"],
        [cluster["small"], "0", "3", "0", "3"],
        [cluster["small"], "1", "4", "0", "4"],
        [cluster["small"], "2", "4", "0", "4"],
        [cluster["small"], "3", "4", "4", "0"],
    ]


def test_explain_reads_slices_classes_and_claims_in_use_from_the_cluster(
    cluster: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = cluster["driver"]
    wanted = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "want-5"},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "cpus",
                        "exactly": {
                            "deviceClassName": cluster["class"],
                            "capacity": {"requests": {f"{driver}/cpu": "5"}},
                        },
                    }
                ]
            }
        },
    }
    path = tmp_path / "claim.yaml"
    path.write_text(yaml.safe_dump(wanted))
    assert main(["explain", "--claim", str(path), "--kubeconfig", cluster["kubeconfig"], "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [cpus] = out["requests"]
    assert out["satisfiable"] is True
    assert out["node"] == cluster["big"]
    assert cpus["candidates"] == [f"{cluster['big']}/cpu-numa1"]
    assert cpus["reasons"][f"{cluster['big']}/cpu-numa0"] == (
        f"{driver}/cpu: requests 5, only 0 of 7 free ({cluster['ns']}/db, {cluster['ns']}/web hold 7)"
    )
    assert (
        cpus["reasons"][f"{cluster['small']}/cpu-numa0"] == f"{driver}/cpu: requests 5, above the requestPolicy (max 3)"
    )


def test_status_of_socket_devices_over_several_numa_nodes() -> None:
    """big-8numa by socket: CPU devices span two NUMA nodes each and have no NUMA attribute: one row per socket
    device, named by its nodes; a claim's consumption counts there."""
    config = DeviceConfig(node_name="n", group_by=GroupBy.SOCKET)
    slices = build_slices(build_devices(read_topology(FIXTURES / "sysfs" / "big-8numa"), config), config)
    usage = [
        {
            "kind": "ResourceClaim",
            "metadata": {"name": "a", "namespace": "ns"},
            "status": {
                "allocation": {"devices": {"results": results("dra.cpu", "n", ("cpu-socket1", "dra.cpu/cpu", "6"))}}
            },
        }
    ]
    rows = cluster_status(parse_slices(slices, "s"), parse_usage(usage, "c"), "dra.cpu")
    # Memory stays per NUMA node: its rows follow the sockets'.
    assert [(r.numa, r.numa_nodes, int(r.cpus.total), int(r.cpus.allocated), r.memory.total > 0) for r in rows] == [
        (-1, "0-1", 15, 0, False),  # CPU 0 stays shared
        (-1, "2-3", 16, 6, False),
        (-1, "4-5", 16, 0, False),
        (-1, "6-7", 16, 0, False),
    ] + [(n, "", 0, 0, True) for n in range(8)]
    assert rows[1].as_dict()["numaNodes"] == "2-3"
    table = render_table(rows).splitlines()
    assert table[2].split()[:5] == ["n", "2-3", "16", "6", "10"]
