"""NodePrepareResources / NodeUnprepareResources through the real sockets, as the kubelet calls them."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceMode, GroupBy
from dra_cpu.core.ledger import PreparedClaim, PreparedDevice
from dra_cpu.kubelet.gen import pluginregistration_v1_pb2, pluginregistration_v1_pb2_grpc
from dra_cpu.store.checkpoint import Checkpoint
from tests.harness.claims import DRIVER, NODE, cpu_config, result
from tests.harness.nodes.standin import NodeFactory
from tests.harness.poll import wait_until


def test_registration_answers_like_a_dra_plugin(node_factory: NodeFactory) -> None:
    node = node_factory()
    with grpc.insecure_channel(f"unix://{node.plugin.paths.registration_socket}") as channel:
        start = time.monotonic()
        info = pluginregistration_v1_pb2_grpc.RegistrationStub(channel).GetInfo(
            pluginregistration_v1_pb2.InfoRequest(), timeout=1
        )
        assert time.monotonic() - start < 1
    assert info.type == "DRAPlugin" and info.name == DRIVER
    assert info.endpoint == str(node.plugin.paths.dra_socket)
    assert list(info.supported_versions) == [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1.DRAResourceHealth",
        "v1alpha1.DRAResourceHealth",
    ]
    assert node.plugin.registered.is_set()


@pytest.mark.parametrize("service", ["v1.DRAPlugin", "v1beta1.DRAPlugin"])
def test_prepare_writes_cdi_and_answers(node_factory: NodeFactory, service: str) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa1", cpus=4)])
    response = node.prepare(ref, service=service)
    assert not response.error
    [device] = response.devices
    assert (device.pool_name, device.device_name, list(device.request_names)) == (NODE, "cpu-numa1", ["cpus"])
    # The claim's CPUs, then (device metadata, on by default) the mount of its request's metadata file.
    assert list(device.cdi_device_ids) == [f"{DRIVER}/cpu=claim-{ref.uid}", f"{DRIVER}/metadata={ref.uid}_cpus"]
    assert device.HasField("share_id") if service.startswith("v1.") else not hasattr(device, "share_id")
    spec = json.loads(node.driver.reconciler.cdi.path(ref.uid).read_text())
    assert spec["cdiVersion"] == "0.5.0" and spec["kind"] == f"{DRIVER}/cpu"
    assert spec["devices"][0]["name"] == f"claim-{ref.uid}"
    env = node.env(ref.uid)
    assert env[f"DRA_CPUSET_{ref.uid}"] == CPUSet.parse("8-11"), "whole cores, packed, on NUMA node 1"
    assert env[f"DRA_MEMS_{ref.uid}"] == CPUSet.parse("1")
    assert env[f"DRA_PODS_{ref.uid}"] == node.pod_uid


def test_two_numa_claim_gets_the_union(node_factory: NodeFactory) -> None:
    """The upstream claim-cpu-capacity-20 example: 10 CPUs from each of two NUMA nodes."""
    node = node_factory("multi-l3-per-node")
    ref = node.claim([result("cpu-numa0", request="numa0", cpus=10), result("cpu-numa1", request="numa1", cpus=10)])
    response = node.prepare(ref)
    assert not response.error
    assert sorted(d.device_name for d in response.devices) == ["cpu-numa0", "cpu-numa1"]
    env = node.env(ref.uid)
    cpus = env[f"DRA_CPUSET_{ref.uid}"]
    assert len(cpus) == 20 and len(cpus & CPUSet.parse("0-15")) == 10
    assert env[f"DRA_MEMS_{ref.uid}"] == CPUSet.parse("0-1")


def test_claims_never_share_a_cpu_and_unprepare_frees(node_factory: NodeFactory) -> None:
    node = node_factory()
    first = node.claim([result("cpu-numa0", cpus=3)])
    second = node.claim([result("cpu-numa0", cpus=4)])
    a, b = node.cpus_of(first), node.cpus_of(second)
    assert a.isdisjoint(b) and len(a) == 3 and len(b) == 4
    assert node.kubelet.unprepare([first]).claims[first.uid].error == ""
    assert not node.driver.reconciler.cdi.path(first.uid).exists()
    third = node.claim([result("cpu-numa0", cpus=3)])
    assert node.cpus_of(third) == a, "freed CPUs are reused, whole cores first"


def test_prepare_is_idempotent_and_unknown_unprepare_succeeds(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa0", cpus=2)])
    first = node.cpus_of(ref)
    node.driver.reconciler.cdi.path(ref.uid).unlink()  # as after a reboot: /var/run is gone
    assert node.cpus_of(ref) == first
    assert node.driver.reconciler.cdi.path(ref.uid).exists()
    other = node.claim([result("cpu-numa0", cpus=1)])
    assert node.kubelet.unprepare([other]).claims[other.uid].error == ""


def test_policies_from_opaque_config(node_factory: NodeFactory) -> None:
    node = node_factory("multi-l3-per-node")
    spread = node.claim([result("cpu-numa0", cpus=4)], [cpu_config(spread=True)])
    # CPU 0 is held back for the shared pool: its sibling 1 is a split core, left for an odd remainder.
    assert node.cpus_of(spread) == CPUSet.parse("2-3,8-9")
    whole = node.claim([result("cpu-numa1", cpus=3)], [cpu_config(wholeCores=True)])
    assert "3 CPUs is not a whole number of cores" in node.prepare(whole).error
    # The class says wholeCores, the claim's own config overrides it for its request.
    override = node.claim(
        [result("cpu-numa1", cpus=3)],
        [cpu_config(["cpus"], source="FromClaim", wholeCores=False), cpu_config(source="FromClass", wholeCores=True)],
    )
    assert len(node.cpus_of(override)) == 3
    aligned = node.claim([result("cpu-numa1", cpus=10)], [cpu_config(alignL3=True)])
    assert "alignL3: no single L3 group has 10 free CPUs" in node.prepare(aligned).error


def test_socket_and_machine_devices(node_factory: NodeFactory) -> None:
    """groupBy socket on big-8numa (sockets of two NUMA nodes under one L3): the claim lands on one NUMA node and its
    memory there; distributeAcrossNUMA splits a claim evenly over the socket's nodes."""
    node = node_factory("big-8numa", group_by=GroupBy.SOCKET)
    packed = node.claim([result("cpu-socket1", cpus=4)])
    assert node.cpus_of(packed) == CPUSet.parse("16-19")
    assert node.env(packed.uid)[f"DRA_MEMS_{packed.uid}"] == CPUSet.parse("2")
    spread = node.claim([result("cpu-socket1", cpus=4)], [cpu_config(distributeAcrossNUMA=True)])
    assert node.cpus_of(spread) == CPUSet.parse("20-21,24-25")
    assert node.env(spread.uid)[f"DRA_MEMS_{spread.uid}"] == CPUSet.parse("2-3")
    odd = node.claim([result("cpu-socket2", cpus=3)], [cpu_config(distributeAcrossNUMA=True)])
    assert "distributeAcrossNUMA: 3 CPUs do not divide into equal shares" in node.prepare(odd).error
    machine = node_factory("big-8numa", group_by=GroupBy.MACHINE)
    whole = cpu_config(distributeAcrossNUMA=True, wholeCores=True)
    half_cores = machine.claim([result("cpu-machine", cpus=8)], [whole])
    assert (
        "NUMA node 0, share of 1: wholeCores: 1 CPUs is not a whole number of cores"
        in machine.prepare(half_cores).error
    )
    ref = machine.claim([result("cpu-machine", cpus=16)], [whole])
    # Node 0's share avoids core 0-1, which CPU 0, held back for the shared pool, splits.
    assert machine.cpus_of(ref) == CPUSet.parse("2-3,8-9,16-17,24-25,32-33,40-41,48-49,56-57")


def test_hugepages_are_recorded(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa0", cpus=2), result("hugepages-2mi-numa0", request="mem", memory="64Mi")])
    response = node.prepare(ref)
    assert not response.error
    env = node.env(ref.uid)
    assert env[f"DRA_HUGEPAGES_{ref.uid}"] == "2048kB@0=67108864"
    assert env[f"DRA_MEMS_{ref.uid}"] == CPUSet.parse("0")


def test_hugepages_are_counted_against_the_device(node_factory: NodeFactory) -> None:
    """Before: every hugepage claim was prepared, 1Ti on a 128Mi device included."""
    node = node_factory()  # node0 reserves 64 pages of 2Mi: 128Mi
    first, second, huge, last = (
        node.claim([result("hugepages-2mi-numa0", request="mem", memory=m)]) for m in ("64Mi", "64Mi", "1Ti", "2Mi")
    )
    assert not node.prepare(first).error and not node.prepare(second).error
    error = node.prepare(huge).error
    assert error.endswith("request 'mem' on hugepages-2mi-numa0: 1Ti of hugepages requested, none of 128Mi free")
    assert "none of 128Mi free" in node.prepare(last).error
    assert node.kubelet.unprepare([first]).claims[first.uid].error == ""
    assert not node.prepare(last).error
    assert "1Ti of hugepages requested, 62Mi of 128Mi free" in node.prepare(huge).error


def test_hugepages_of_one_claim_add_up(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim(
        [
            result("hugepages-2mi-numa1", request="a", memory="48Mi"),
            result("hugepages-2mi-numa1", request="b", memory="32Mi"),
        ]
    )
    assert "request 'b' on hugepages-2mi-numa1: 32Mi of hugepages requested, 16Mi of 64Mi free" in (
        node.prepare(ref).error
    )


def test_memory_is_counted_per_numa_node(node_factory: NodeFactory) -> None:
    """dual-socket-smt2 has 305Mi of node 0 and 412Mi of node 1 for claims. No byte in two claims, nothing over what
    a node has, whatever the scheduler allocated; an unprepare gives it back."""
    node = node_factory()
    first = node.claim([result("cpu-numa0", cpus=2), result("memory-numa0", "mem", memory="200Mi")])
    assert not node.prepare(first).error
    env = node.env(first.uid)
    assert (env[f"DRA_MEMS_{first.uid}"], env[f"DRA_MEMORY_{first.uid}"]) == (CPUSet.parse("0"), f"0={200 << 20}")
    assert env[f"DRA_MEMORY_BINDING_{first.uid}"] == "strict"
    second = node.claim([result("cpu-numa0", cpus=2), result("memory-numa0", "mem", memory="200Mi")])
    assert node.prepare(second).error.endswith(
        "request 'mem' on memory-numa0: 200Mi of memory requested, 105Mi of 305Mi free"
    )
    odd = node.claim([result("memory-numa1", "mem", memory="1500Ki")])
    assert "1500Ki is not a whole number of 1Mi steps" in node.prepare(odd).error
    assert node.kubelet.unprepare([first]).claims[first.uid].error == ""
    assert not node.prepare(second).error
    assert node.driver.snapshot().ledger.allocated_memory == {0: 200 << 20}


def test_memory_over_two_nodes_and_with_hugepages_in_one_claim(node_factory: NodeFactory) -> None:
    """As the Memory Manager's groups: memory of two nodes in one claim, bound to both. And CPUs, hugepages and
    memory of one node in one claim (hack/examples/claim-cpu-memory-hugepages.yaml), bound there."""
    node = node_factory()
    wide = node.claim(
        [
            result("cpu-numa0", cpus=2),
            result("memory-numa0", "mem", memory="300Mi"),
            result("memory-numa1", "mem", memory="300Mi"),
        ]
    )
    assert not node.prepare(wide).error
    env = node.env(wide.uid)
    assert (env[f"DRA_MEMS_{wide.uid}"], env[f"DRA_MEMORY_{wide.uid}"]) == (
        CPUSet.parse("0-1"),
        f"0={300 << 20},1={300 << 20}",
    )
    together = node.claim(
        [
            result("cpu-numa1", cpus=4),
            result("memory-numa1", "mem", memory="100Mi"),
            result("hugepages-2mi-numa1", "pages", memory="32Mi"),
        ]
    )
    response = node.prepare(together)
    assert not response.error
    assert sorted(d.device_name for d in response.devices) == ["cpu-numa1", "hugepages-2mi-numa1", "memory-numa1"]
    env = node.env(together.uid)
    assert env[f"DRA_MEMS_{together.uid}"] == CPUSet.parse("1")
    assert env[f"DRA_HUGEPAGES_{together.uid}"] == f"2048kB@1={32 << 20}"
    assert env[f"DRA_MEMORY_{together.uid}"] == f"1={100 << 20}"
    assert node.driver.snapshot().ledger.allocated_memory == {0: 300 << 20, 1: 400 << 20}


def test_a_claim_of_cpus_only_prefers_its_node_and_strict_is_opt_in(node_factory: NodeFactory) -> None:
    node = node_factory()
    plain = node.claim([result("cpu-numa1", cpus=2)])
    strict = node.claim([result("cpu-numa1", cpus=2)], [cpu_config(memoryBinding="strict")])
    assert not node.prepare(plain).error
    assert node.env(plain.uid)[f"DRA_MEMORY_BINDING_{plain.uid}"] == "preferred"
    assert not node.prepare(strict).error
    assert node.env(strict.uid)[f"DRA_MEMORY_BINDING_{strict.uid}"] == "strict"
    assert node.env(strict.uid)[f"DRA_MEMS_{strict.uid}"] == CPUSet.parse("1")
    both = node.claim(
        [result("cpu-numa1", cpus=1), result("memory-numa1", "mem", memory="1Mi")],
        [cpu_config(["cpus"], memoryBinding="strict"), cpu_config(["mem"], memoryBinding="preferred")],
    )
    assert node.prepare(both).error.endswith(
        "its requests' CPUConfig set memoryBinding to preferred and strict; a claim's memory is bound one way"
    )


def test_individual_mode(node_factory: NodeFactory) -> None:
    node = node_factory("big-8numa", mode=DeviceMode.INDIVIDUAL)
    ref = node.claim([result("cpu-9"), result("cpu-41")])
    assert node.cpus_of(ref) == CPUSet.parse("9,41")
    assert node.env(ref.uid)[f"DRA_MEMS_{ref.uid}"] == CPUSet.parse("1,5")
    again = node.claim([result("cpu-41")])
    assert f"CPU 41 of device cpu-41 is already prepared for claim default/{ref.name}" in node.prepare(again).error


def _allocated() -> dict[str, Any]:
    return {"devices": {"results": [result("cpu-numa0", cpus=1)]}}


def _status(**allocation: Any) -> dict[str, Any]:
    return {"allocation": {"devices": allocation}} if allocation else {}


@pytest.mark.parametrize(
    ("results", "config", "status", "message"),
    [
        ([], None, {}, "status.allocation is empty: the claim is not allocated"),
        (
            [result("cpu-numa0", cpus=1) | {"pool": "node-b"}],
            None,
            None,
            "pool is 'node-b' but this node serves pool 'node-a'",
        ),
        (
            [result("cpu-numa0", cpus=1) | {"driver": "gpu.example.com"}],
            None,
            None,
            "no allocation result is for driver 'dra.cpu'",
        ),
        (
            [result("cpu-numa7", cpus=1)],
            None,
            None,
            "device 'cpu-numa7' (request 'cpus') is not published by this node",
        ),
        (
            [result("cpu-numa0")],
            None,
            None,
            "has no consumedCapacity['dra.cpu/cpu'] (is the DRAConsumableCapacity feature gate on?)",
        ),
        (
            [result("cpu-numa0", cpus="500m")],
            None,
            None,
            "consumedCapacity['dra.cpu/cpu'] '500m' must be a positive whole number",
        ),
        ([result("cpu-numa0", cpus=8)], None, None, "8 CPUs requested but only 7 are free"),
        (
            [result("cpu-numa0", cpus=1)],
            [cpu_config(wholeCore=True)],
            None,
            "parameters.wholeCore is not a known field",
        ),
        (
            [result("cpu-numa0", cpus=1)],
            [cpu_config(wholeCores="yes")],
            None,
            "parameters.wholeCores must be true or false, not 'yes'",
        ),
        (
            [result("cpu-numa0", cpus=1)],
            [cpu_config(spread=True, alignL3=True)],
            None,
            "spread and alignL3 contradict each other",
        ),
        ([result("hugepages-2mi-numa0", memory="3Mi")], None, None, "3Mi is not a whole number of 2048 KiB pages"),
        # A field of the wrong JSON type: one clear error for that claim, naming the field and the value.
        (
            [result("cpu-numa0", cpus=1) | {"shareID": {"x": 1}}],
            None,
            None,
            "status.allocation.devices.results[0].shareID must be a non-empty string, not {'x': 1}",
        ),
        (
            [result("cpu-numa0") | {"consumedCapacity": {"dra.cpu/cpu": [1]}}],
            None,
            None,
            "status.allocation.devices.results[0].consumedCapacity['dra.cpu/cpu'] must be a quantity, not [1]",
        ),
        (
            [result("cpu-numa0") | {"consumedCapacity": {"dra.cpu/cpu": True}}],
            None,
            None,
            "consumedCapacity['dra.cpu/cpu'] must be a quantity, not True",
        ),
        (
            [result("cpu-numa0", cpus=1) | {"request": ["cpus"]}],
            None,
            None,
            "status.allocation.devices.results[0].request must be a non-empty string, not ['cpus']",
        ),
        (
            [result("cpu-numa0", cpus=1)],
            None,
            {"allocation": _allocated(), "reservedFor": [{"resource": "pods", "name": "p", "uid": {"u": 1}}]},
            "status.reservedFor[0].uid must be a non-empty string, not {'u': 1}",
        ),
        (
            [result("cpu-numa0", cpus=1)],
            None,
            {"allocation": _allocated(), "reservedFor": [{"resource": "pods", "name": 7, "uid": "u"}]},
            "status.reservedFor[0].name must be a string, not 7",
        ),
        (
            [result("cpu-numa0", cpus=1)],
            [cpu_config(wholeCores=True) | {"requests": [7]}],
            None,
            "status.allocation.devices.config[0].requests[0] must be a non-empty string, not 7",
        ),
        (
            [result("cpu-numa0", cpus=1)],
            [{"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": []}}],
            None,
            "config[0].opaque.parameters must be an object, not []",
        ),
    ],
)
def test_bad_claims_fail_per_claim_with_the_value(
    node_factory: NodeFactory,
    results: list[dict[str, Any]],
    config: list[dict[str, Any]] | None,
    status: dict[str, Any] | None,
    message: str,
) -> None:
    node = node_factory()
    good = node.claim([result("cpu-numa1", cpus=1)])
    bad = node.claim(results, config, status=status)
    response = node.kubelet.prepare([good, bad])
    assert response.claims[good.uid].error == ""
    assert message in response.claims[bad.uid].error
    assert not node.driver.reconciler.cdi.path(bad.uid).exists()
    assert set(node.driver.snapshot().ledger.claims) == {good.uid}, "nothing half-applied"


def test_claim_not_found_and_uid_mismatch(node_factory: NodeFactory) -> None:
    from dra_cpu.core.claims import ClaimRef

    node = node_factory()
    missing = ClaimRef("default", "nope", "00000000-0000-4000-8000-000000000001")
    assert node.prepare(missing).error == "claim default/nope not found on the API server"
    ref = node.claim([result("cpu-numa0", cpus=1)])
    stale = ClaimRef(ref.namespace, ref.name, "00000000-0000-4000-8000-000000000002")
    assert "metadata.uid is" in node.kubelet.prepare([stale]).claims[stale.uid].error


def test_unwritable_cdi_folder_rolls_back(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa0", cpus=2)])
    # A file where the CDI folder should be: root ignores permission bits, but not this.
    node.driver.reconciler.cdi.root.write_text("not a folder")
    error = node.prepare(ref).error
    assert "cannot write CDI spec" in error
    assert node.driver.snapshot().ledger.claims == {}
    checkpoint = node.driver.reconciler.checkpoint.load()
    assert checkpoint is not None and checkpoint.ledger.claims == {}


def test_min_shared_cpus(node_factory: NodeFactory) -> None:
    """The floor is held back from the device (CPU 0 of 2 is not published), so the scheduler never allocates it;
    prepare still refuses a claim that would break it, which only a claim prepared before the settings changed can
    make happen (one holding the CPU now kept shared)."""
    node = node_factory("kvm-2cpu")
    assert node.driver.snapshot().view.devices[0].cpus == CPUSet.parse("1")
    ref = node.claim([result("cpu-numa0", cpus=2)])
    assert "2 CPUs requested but only 1 are free" in node.prepare(ref).error
    ok = node.claim([result("cpu-numa0", cpus=1)])
    assert node.cpus_of(ok) == CPUSet.parse("1")
    assert node.kubelet.unprepare([ok]).claims[ok.uid].error == ""
    earlier = PreparedClaim(
        ClaimRef("default", "earlier", "00000000-0000-4000-8000-0000000000e0"),
        (PreparedDevice(("cpus",), "n", "cpu-numa0", cpus=CPUSet.parse("0")),),
    )
    # As a checkpoint written before minSharedCpus was raised leaves it, recovered by a restart.
    files = node.driver.reconciler
    files.checkpoint.save(Checkpoint(node.driver.snapshot().ledger.with_claim(earlier), files.boot_id))
    node.driver.start()
    late = node.claim([result("cpu-numa0", cpus=1)])
    assert "taking CPUs 1 would leave 0 shared CPU(s) (none); at least 1 must stay" in node.prepare(late).error


def test_fifty_parallel_prepares_never_share_a_cpu(node_factory: NodeFactory) -> None:
    node = node_factory("big-8numa")
    refs = [node.claim([result(f"cpu-numa{i % 8}", cpus=1)]) for i in range(50)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda r: node.kubelet.prepare([r]).claims[r.uid], refs))
    assert all(not r.error for r in responses)
    cpus = [node.env(r.uid)[f"DRA_CPUSET_{r.uid}"] for r in refs]
    assert len(CPUSet.union_all(cpus)) == 50


def test_empty_claim_fields_are_rejected_per_claim(node_factory: NodeFactory) -> None:
    from dra_cpu.core.claims import ClaimRef

    node = node_factory()
    uid = "00000000-0000-4000-8000-000000000003"
    response = node.kubelet.prepare([ClaimRef("default", "", uid)])
    assert "empty name" in response.claims[uid].error


def test_refused_registration_is_retried_with_a_new_socket(node_factory: NodeFactory) -> None:
    from dra_cpu.kubelet.client import KubeletClient, KubeletError

    node = node_factory()
    node.plugin.retry_seconds = (0.1, 1.0)
    socket = node.plugin.paths.registration_socket
    # A new socket, as the kubelet's watcher sees one: created anew (the inode number may be reused).
    first = socket.stat().st_ctime_ns
    with pytest.raises(KubeletError):
        KubeletClient.register(socket, accept=False).close()
    assert not node.plugin.registered.is_set()
    wait_until(
        lambda: socket.stat().st_ctime_ns != first,
        "a new registration socket after the refusal",
        10,
        retry_on=(FileNotFoundError,),
    )
    KubeletClient.register(socket).close()
    assert node.plugin.registered.is_set()


def test_plugin_sockets_are_0600(node_factory: NodeFactory) -> None:
    """Before: both sockets were left at the umask's 0755."""
    node = node_factory()
    for path in (node.plugin.paths.dra_socket, node.plugin.paths.registration_socket):
        assert path.stat().st_mode & 0o777 == 0o600, path
