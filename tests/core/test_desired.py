"""core/desired.py: what the node should have for each claim, as values: its CDI spec, its metadata files (derived,
kept as found, or none), the pins, and the CDI ids of the prepare's answer."""

from __future__ import annotations

from dataclasses import replace

from dra_cpu.core import desired
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig
from dra_cpu.core.ledger import ClaimMetadata, HugePageGrant, Ledger, PreparedClaim, PreparedDevice
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS

VIEW = NodeView.of(read_topology(SYSFS / "dual-socket-smt2"), NodeSettings(DeviceConfig(node_name="node-a")))
REF = ClaimRef("ns", "c", "uid-1")
CLAIM = PreparedClaim(
    REF,
    (
        PreparedDevice(("cpus",), "node-a", "cpu-numa0", cpus=CPUSet.parse("2-3")),
        PreparedDevice(("mem",), "node-a", "hugepages-2mi-numa0", hugepages=HugePageGrant(0, 2048, 4 << 20)),
    ),
    ("pod-1",),
    ClaimMetadata("pinned", ("cpus/big", "mem")),
)


def test_a_claim_gets_its_spec_and_one_metadata_file_per_request() -> None:
    files = desired.claim_files(CLAIM, VIEW)
    assert files.uid == "uid-1" and not files.metadata_problem
    env = files.cdi_spec["devices"][0]["containerEdits"]["env"]
    assert "DRA_CPUSET_uid-1=2-3" in env and "DRA_PODS_uid-1=pod-1" in env
    assert [(f.request.name, f.request.pod_claim_name, f.as_found) for f in files.metadata] == [
        ("cpus/big", "pinned", False),
        ("mem", "pinned", False),
    ]
    [cpus] = files.metadata[0].request.devices
    assert cpus["name"] == "cpu-numa0" and cpus["attributes"]["dra.cpu/allocatedNumCPUs"] == {"int": 2}


def test_a_claim_without_metadata_has_none_and_an_unnamed_one_keeps_its_files_as_found() -> None:
    assert desired.claim_files(replace(CLAIM, metadata=None), VIEW).metadata == ()
    rebuilt = replace(CLAIM, devices=(PreparedDevice((), "node-a", "", cpus=CPUSet.parse("2-3")),))
    files = desired.claim_files(rebuilt, VIEW)
    assert [(f.request.name, f.request.devices, f.as_found) for f in files.metadata] == [
        ("cpus/big", (), True),
        ("mem", (), True),
    ]


def test_names_that_cannot_be_paths_are_a_problem_not_a_failure() -> None:
    files = desired.claim_files(replace(CLAIM, metadata=ClaimMetadata("../x", ("cpus",))), VIEW)
    assert files.metadata == () and "is not a DNS label" in files.metadata_problem
    assert files.cdi_spec == desired.claim_files(CLAIM, VIEW).cdi_spec


def test_the_pins_take_the_claims_cpus_out_of_the_shared_pool_and_strict_reserved_the_reserved_ones() -> None:
    shared = desired.pins(Ledger({CLAIM.uid: CLAIM}), VIEW).shared
    assert not shared & CLAIM.cpus and shared == VIEW.topology.online_cpus - CLAIM.cpus
    settings = NodeSettings(DeviceConfig(node_name="node-a", reserved_cpus=CPUSet.parse("0-1"), strict_reserved=True))
    strict = desired.pins(Ledger({CLAIM.uid: CLAIM}), NodeView.of(VIEW.topology, settings)).shared
    assert strict == shared - CPUSet.parse("0-1")


def test_the_answer_names_a_requests_metadata_on_its_first_device_only() -> None:
    two = replace(CLAIM, devices=(CLAIM.devices[0], replace(CLAIM.devices[0], device="cpu-numa1"), CLAIM.devices[1]))
    ids = desired.cdi_ids(two, "dra.cpu", {"cpus": "dra.cpu/metadata=uid-1_cpus"})
    assert ids == (
        ("dra.cpu/cpu=claim-uid-1", "dra.cpu/metadata=uid-1_cpus"),
        ("dra.cpu/cpu=claim-uid-1",),
        ("dra.cpu/cpu=claim-uid-1",),
    )
