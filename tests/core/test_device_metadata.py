"""core/device_metadata.py: the names and paths of KEP-5304's files, the attributes a device's entry gets, and the
format's validation rules, as values."""

from __future__ import annotations

from typing import Any

import pytest

from dra_cpu.core import device_metadata as dm
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig, build_devices
from dra_cpu.core.ledger import HugePageGrant, PreparedClaim, PreparedDevice
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS

UID = "0b5a3c1e-2f4d-4c6b-8a9e-1d2c3b4a5f60"
REF = ClaimRef("team-a", "big.claim", UID)


def test_paths_and_names_are_the_helpers_but_on_the_host_flat_by_uid() -> None:
    assert dm.host_file("/var/lib/kubelet/plugins/dra.cpu", UID, "cpus") == (
        f"/var/lib/kubelet/plugins/dra.cpu/dra-device-metadata/{UID}_cpus.json"
    )
    assert dm.host_file_key(f"{UID}_cpus.json") == (UID, "cpus")
    for name in ("metadata.json", f"{UID}_.json", f"_{UID}.json", f"{UID}_cpus.json.abcd1234.tmp", f"{UID}_cpus"):
        assert dm.host_file_key(name) is None, name
    assert dm.container_file("dra.cpu", "big.claim", None, "cpus") == (
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/big.claim/cpus/dra.cpu-metadata.json"
    )
    assert dm.container_file("dra.cpu", "pod-x-pinned-abcde", "pinned", "cpus") == (
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/pinned/cpus/dra.cpu-metadata.json"
    )
    assert dm.cdi_spec_filename("dra.cpu", UID, "cpus") == f"dra.cpu_metadata_{UID}_cpus.json"
    assert dm.cdi_device_id("dra.cpu", UID, "cpus") == f"dra.cpu/metadata={UID}_cpus"


def _claim(cpus: CPUSet) -> PreparedClaim:
    return PreparedClaim(REF, (PreparedDevice(("cpus",), "node-a", "cpu-numa0", cpus=cpus),))


def test_a_cpu_list_too_long_for_an_attribute_string_is_left_out_not_cut() -> None:
    topology = read_topology(SYSFS / "big-8numa")
    devices = {d.name: d for d in build_devices(topology, DeviceConfig(node_name="node-a"))}
    scattered = CPUSet.of(range(0, 64, 2))
    assert len(str(scattered)) > 64
    [request] = dm.claim_requests("dra.cpu", _claim(scattered), {}, None, devices, topology)
    [entry] = request.devices
    attributes: dict[str, Any] = entry["attributes"]
    assert "dra.cpu/allocatedCPUs" not in attributes
    assert attributes["dra.cpu/allocatedNumCPUs"] == {"int": 32}
    assert len(attributes) <= dm.MAX_ATTRIBUTES
    assert all(len(v.get("string", "")) <= 64 for v in attributes.values())
    dm.check(dm.document(request, "v1beta1"))


def test_a_device_no_longer_published_still_gets_what_the_claim_holds() -> None:
    topology = read_topology(SYSFS / "kvm-2cpu")
    claim = PreparedClaim(
        REF,
        (
            PreparedDevice(("mem",), "node-a", "hugepages-2mi-numa0", hugepages=HugePageGrant(0, 2048, 4 << 20)),
            PreparedDevice(("mem",), "node-a", "gone", cpus=CPUSet.of([1])),
        ),
    )
    [request] = dm.claim_requests("dra.cpu", claim, {"mem": "mem/small"}, "p", {}, topology)
    assert request.name == "mem/small" and request.base_request == "mem"
    assert [d["attributes"] for d in request.devices] == [
        {"dra.cpu/allocatedHugepagesBytes": {"int": 4 << 20}, "dra.cpu/allocatedMemoryNodes": {"string": "0"}},
        {
            "dra.cpu/allocatedCPUs": {"string": "1"},
            "dra.cpu/allocatedMemoryNodes": {"string": "0"},
            "dra.cpu/allocatedNumCPUs": {"int": 1},
        },
    ]


@pytest.mark.parametrize(
    ("pod_claim", "request_name", "error"),
    [("../x", "cpus", "is not a DNS label"), (None, "a/../b", "is not a DNS label"), (None, "A", "not a DNS label")],
)
def test_names_that_become_path_parts_must_be_dns_labels(pod_claim: str | None, request_name: str, error: str) -> None:
    topology = read_topology(SYSFS / "kvm-2cpu")
    claim = PreparedClaim(REF, (PreparedDevice((request_name,), "node-a", "cpu-numa0", cpus=CPUSet.of([1])),))
    with pytest.raises(dm.MetadataError) as failure:
        dm.claim_requests("dra.cpu", claim, {}, pod_claim, {}, topology)
    assert error in str(failure.value)


def _doc(**device: Any) -> dict[str, Any]:
    entry = {"driver": "dra.cpu", "pool": "node-a", "name": "cpu-numa0", **device}
    return {"apiVersion": "metadata.resource.k8s.io/v1beta1", "requests": [{"name": "r", "devices": [entry]}]}


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        (_doc(attributes={f"a{i}": {"int": i} for i in range(33)}), "at most 32 attributes"),
        (_doc(attributes={"a": {"string": "x" * 65}}), "longer than 64 characters"),
        (_doc(attributes={"a": {}}), "exactly one of"),
        (_doc(name="Not_A_Label"), "is not a DNS label"),
        (_doc(driver="x" * 64), "at most 63 characters"),
        ({"apiVersion": "v", "podClaimName": "a/b"}, "podClaimName"),
        ({"apiVersion": "v", "requests": [{"devices": []}]}, "requests[0].name"),
    ],
)
def test_the_formats_validation_rules(doc: dict[str, Any], error: str) -> None:
    with pytest.raises(dm.MetadataError) as failure:
        dm.check(doc)
    assert error in str(failure.value)
