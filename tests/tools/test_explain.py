"""dra-cpu explain: claims explained against the slices dra-cpu builds from real-kernel sysfs captures, with the
expected candidates worked out from the topology itself; hand-made failing claims give the reason that matters."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from dra_cpu.cli import main
from dra_cpu.core.claims import allocated_claim_object, allocation_result
from dra_cpu.core.devices import DeviceConfig, GroupBy, allocatable_cpus, build_devices, build_slices
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.cel.library import CelError
from dra_cpu.tools.explain.inputs import load_objects
from dra_cpu.tools.explain.model import ExplainInputError
from dra_cpu.tools.explain.parse import describe, parse_claim, parse_class, parse_slices, parse_usage
from dra_cpu.tools.explain.result import Explanation
from dra_cpu.tools.explain.search import explain
from tests.harness.paths import EXAMPLES, FIXTURES

EXPLAIN = FIXTURES / "explain"
CLASSES = EXPLAIN / "classes.yaml"
CLAIMS = {obj["metadata"]["name"]: obj for obj in load_objects(EXPLAIN / "claims.yaml")}
MIB = 1 << 20


# The example GPU driver's DeviceClass and ResourceSlice (node-a) that hack/examples/claim-cpu-gpu-pcie-root.yaml needs.
GPU_EXAMPLE = load_objects(EXAMPLES / "pcie-root" / "gpu-example-com.yaml")
GPU_CLASSES = [o for o in GPU_EXAMPLE if o["kind"] == "DeviceClass"]
GPU_SLICES = [o for o in GPU_EXAMPLE if o["kind"] == "ResourceSlice"]


def slices_of(root: Path, **config: Any) -> tuple[Topology, list[dict[str, Any]]]:
    topology = read_topology(root, pcie_roots=bool(config.get("pcie_roots")))
    device_config = DeviceConfig(node_name="node-a", **config)
    return topology, build_slices(build_devices(topology, device_config), device_config)


def run(
    claim: dict[str, Any],
    slices: list[dict[str, Any]],
    in_use: Sequence[dict[str, Any]] = (),
    extra_classes: Sequence[dict[str, Any]] = (),
) -> Explanation:
    classes = {c.name: c for c in (parse_class(o, "classes") for o in [*load_objects(CLASSES), *extra_classes])}
    parsed = parse_claim(claim, "claim")
    return explain(parsed, classes, parse_slices(slices, "slices"), parse_usage(in_use, "in-use"))


def request(result: Explanation, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in result.as_dict()["requests"] if r["name"] == name)
    return found


def shared_cpus(topology: Topology) -> dict[int, int]:
    """NUMA node -> CPUs a dra.cpu claim may get there, from the topology rather than from the slices."""
    available = allocatable_cpus(topology, DeviceConfig(node_name="node-a")) - topology.isolated_cpus
    return {node.id: len(node.cpus & available) for node in topology.numa_nodes if node.cpus & available}


def hugepages_2mi(topology: Topology) -> dict[int, int]:
    return {
        node.id: pool.total * pool.size_bytes
        for node in topology.numa_nodes
        for pool in node.hugepages
        if pool.size_kib == 2048 and pool.total > 0
    }


def test_capacity_claims_on_every_fixture(sysfs_fixture: Path) -> None:
    topology, slices = slices_of(sysfs_fixture)
    cpus = shared_cpus(topology)
    for name, amount in (("cpus-4", 4), ("cpus-10", 10)):
        result = run(CLAIMS[name], slices)
        fitting = [f"cpu-numa{n}" for n, count in cpus.items() if count >= amount]
        assert request(result, "cpus")["candidates"] == fitting, name
        assert result.satisfiable == bool(fitting)
        for device in set(f"cpu-numa{n}" for n in cpus) - set(fitting):
            assert (
                f"requests {amount}, above the requestPolicy (max {cpus[int(device[8:])]})"
                in (request(result, "cpus")["reasons"][device])
            )
        if fitting:
            assert result.node == "node-a"
            assert request(result, "cpus")["allocated"]["devices"] == fitting[:1]
        else:
            assert "cpus: needs 1 device(s); 0 pass" in result.reason


def test_numa_pinned_template(sysfs_fixture: Path) -> None:
    topology, slices = slices_of(sysfs_fixture)
    result = run(CLAIMS["numa0-cpus"], slices)
    numa0 = request(result, "numa0-cpus")
    # 2 CPUs: a node of 2 keeps one for containers without claims and publishes the other.
    fits = shared_cpus(topology).get(0, 0) >= 2
    assert numa0["candidates"] == (["cpu-numa0"] if fits else [])
    assert result.satisfiable == fits
    for node in set(shared_cpus(topology)) - {0}:
        assert f"(resource.kubernetes.io/numaNode is {node})" in numa0["reasons"][f"cpu-numa{node}"]


def test_cpus_and_hugepages_on_one_numa_node(sysfs_fixture: Path) -> None:
    topology, slices = slices_of(sysfs_fixture)
    cpus, pages = shared_cpus(topology), hugepages_2mi(topology)
    both = sorted(n for n in cpus if cpus[n] >= 2 and pages.get(n, 0) >= 64 * MIB)
    result = run(CLAIMS["cpus-and-hugepages"], slices)
    assert result.satisfiable == bool(both)
    if both:
        assert request(result, "cpus")["allocated"]["devices"] == [f"cpu-numa{both[0]}"]
        assert request(result, "hugepages")["allocated"]["devices"] == [f"hugepages-2mi-numa{both[0]}"]
    elif pages:
        assert "matchAttribute resource.kubernetes.io/numaNode" in result.reason or "hugepages:" in result.reason
    else:
        assert "hugepages: needs 1 device(s); 0 pass" in result.reason


def test_isolated_claim_finds_no_isolated_cpus(sysfs_fixture: Path) -> None:
    topology, slices = slices_of(sysfs_fixture)
    assert not topology.isolated_cpus  # the captures have no isolcpus; the claim must say why it cannot fit
    result = run(CLAIMS["isolated"], slices)
    assert not result.satisfiable
    reasons = request(result, "cpus")["reasons"]
    for node in shared_cpus(topology):
        assert (
            'has(device.attributes["dra.cpu"].isolated)\' is false (dra.cpu/isolated is missing)'
            in (reasons[f"cpu-numa{node}"])
        )


def test_first_available_takes_the_first_subrequest_that_fits(sysfs_fixture: Path) -> None:
    topology, slices = slices_of(sysfs_fixture)
    result = run(CLAIMS["prefer-20"], slices)
    most = max(shared_cpus(topology).values())
    expected = "cpus/big" if most >= 20 else "cpus/small"
    assert result.satisfiable == (most >= 2)
    if result.satisfiable:
        assert request(result, "cpus")["allocated"]["subrequest"] == expected
    assert [s["name"] for s in request(result, "cpus")["subrequests"]] == ["cpus/big", "cpus/small"]


def test_distinct_attribute_needs_two_numa_nodes(sysfs_fixture: Path) -> None:
    topology, slices = slices_of(sysfs_fixture)
    result = run(CLAIMS["spread"], slices)
    nodes = sorted(shared_cpus(topology))
    assert result.satisfiable == (len(nodes) >= 2)
    if result.satisfiable:
        assert request(result, "a")["allocated"]["devices"] == [f"cpu-numa{nodes[0]}"]
        assert request(result, "b")["allocated"]["devices"] == [f"cpu-numa{nodes[1]}"]
    elif shared_cpus(topology)[nodes[0]] >= 2:
        assert "distinctAttribute dra.cpu/numaNodeID over all requests" in result.reason
    else:
        assert "dra.cpu/cpu does not cover all the requests of this claim together" in result.reason


DUAL = FIXTURES / "sysfs" / "dual-socket-smt2"


def cpus_claim(amount: str, *selectors: str, name: str = "c") -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": "dra.cpu", "capacity": {"requests": {"dra.cpu/cpu": amount}}}
    if selectors:
        exactly["selectors"] = [{"cel": {"expression": s}} for s in selectors]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"devices": {"requests": [{"name": "cpus", "exactly": exactly}]}},
    }


def test_wrong_attribute_name_is_a_runtime_error_that_stops_the_scheduler() -> None:
    _, slices = slices_of(DUAL)
    result = run(cpus_claim("2", 'device.attributes["dra.cpu"].numaNode == 0'), slices)
    assert not result.satisfiable
    assert "CEL runtime error stops the scheduler" in result.reason
    assert "attribute dra.cpu/numaNode is missing" in result.reason
    assert request(result, "cpus")["candidates"] == []


def test_a_missing_domain_is_an_empty_map_and_has_is_false() -> None:
    _, slices = slices_of(DUAL)
    result = run(cpus_claim("2", 'has(device.attributes["gpu.example.com"].numaNode)'), slices)
    assert not result.satisfiable
    reason = request(result, "cpus")["reasons"]["cpu-numa0"]
    assert reason == (
        "request cpus selectors[0]: 'has(device.attributes[\"gpu.example.com\"].numaNode)' is false "
        "(gpu.example.com/numaNode is missing)"
    )


def test_capacity_too_large_names_the_policy_maximum() -> None:
    _, slices = slices_of(DUAL)
    result = run(cpus_claim("9"), slices)
    assert not result.satisfiable
    assert request(result, "cpus")["reasons"]["cpu-numa1"] == (
        "dra.cpu/cpu: requests 9, above the requestPolicy (max 8)"
    )


def test_whole_cores_round_a_request_up_to_the_step() -> None:
    _, slices = slices_of(DUAL, whole_cores=True)
    result = run(cpus_claim("3"), slices)
    assert result.satisfiable
    # Core 0-1 is held back for the shared pool (minSharedCpus 1, whole cores): 6 of node 0's 8 CPUs are published.
    assert request(result, "cpus")["details"]["cpu-numa0"] == "dra.cpu/cpu: requests 3, rounded up to 4, 6 of 6 free"


def allocated(name: str, device: str, amount: str, key: str = "dra.cpu/cpu") -> dict[str, Any]:
    return allocated_claim_object(
        "team", name, [allocation_result("dra.cpu", "node-a", device, consumed={key: amount})]
    )


def test_claims_in_use_leave_less_room() -> None:
    _, slices = slices_of(DUAL)
    in_use = [allocated("one", "cpu-numa0", "4"), allocated("two", "cpu-numa0", "2"), allocated("x", "cpu-numa1", "1")]
    result = run(cpus_claim("4"), slices, in_use)
    cpus = request(result, "cpus")
    assert cpus["candidates"] == ["cpu-numa1"]
    # cpu-numa0 publishes 7: CPU 0 stays shared.
    assert cpus["reasons"]["cpu-numa0"] == "dra.cpu/cpu: requests 4, only 1 of 7 free (team/one, team/two hold 6)"
    assert cpus["details"]["cpu-numa1"] == "dra.cpu/cpu: requests 4, 7 of 8 free (team/x hold 1)"
    assert cpus["allocated"]["devices"] == ["cpu-numa1"]


def test_requests_of_one_claim_share_a_device_capacity() -> None:
    _, slices = slices_of(DUAL)
    claim = copy.deepcopy(CLAIMS["spread"])
    for r in claim["spec"]["devices"]["requests"]:
        r["exactly"]["capacity"]["requests"]["dra.cpu/cpu"] = "5"
        r["exactly"]["selectors"] = [{"cel": {"expression": 'device.attributes["dra.cpu"].numaNodeID == 0'}}]
    claim["spec"]["devices"]["constraints"] = []
    result = run(claim, slices)
    assert request(result, "a")["candidates"] == request(result, "b")["candidates"] == ["cpu-numa0"]
    assert not result.satisfiable
    assert "cpu-numa0: dra.cpu/cpu does not cover all the requests of this claim together" in result.reason


def test_unsatisfiable_constraint_shows_what_each_request_offers() -> None:
    _, slices = slices_of(DUAL)
    claim = copy.deepcopy(CLAIMS["cpus-and-hugepages"])
    cpus, pages = claim["spec"]["devices"]["requests"]
    cpus["exactly"]["selectors"] = [{"cel": {"expression": 'device.attributes["dra.cpu"].numaNodeID == 0'}}]
    pages["exactly"]["selectors"] = [{"cel": {"expression": 'device.attributes["dra.cpu"].numaNodeID == 1'}}]
    result = run(claim, slices)
    assert not result.satisfiable
    assert request(result, "cpus")["candidates"] == ["cpu-numa0"]
    assert request(result, "hugepages")["candidates"] == ["hugepages-2mi-numa1"]
    assert result.reason == (
        "no combination of candidates fits together: matchAttribute resource.kubernetes.io/numaNode over cpus, "
        "hugepages (resource.kubernetes.io/numaNode: cpus offers 0; hugepages offers 1)"
    )


def test_missing_device_class_is_the_reason() -> None:
    _, slices = slices_of(DUAL)
    claim = cpus_claim("1")
    claim["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] = "dra.gpu"
    result = run(claim, slices)
    assert not result.satisfiable
    assert result.reason.startswith("cpus: DeviceClass 'dra.gpu' not found (dra.cpu, dra.cpu.isolated,")


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            'device.attributes["dra.cpu"].numaNodeID = 0',
            "CEL syntax error at line 1, column 41: unexpected character '='",
        ),
        (
            'device.attributes["dra.cpu"].type.contans("c")',
            "CEL type error at line 1, column 35: undeclared reference to function 'contans'",
        ),
        ('device.drivr == "dra.cpu"', "CEL type error at line 1, column 8: undefined field 'drivr' of device"),
        (
            "device.driver == 1",
            "CEL type error at line 1, column 1: found no matching overload for '_==_' applied to '(string, int)'",
        ),
        ('device.driver == "dra.cpu" &&', "CEL syntax error at line 1, column 28: unexpected end of expression"),
    ],
)
def test_cel_mistakes_are_reported_with_their_position(expression: str, message: str) -> None:
    with pytest.raises(CelError) as err:
        parse_claim(cpus_claim("1", expression), "claim.yaml")
    assert str(err.value).startswith(f"request cpus selectors[0]: {message}")


def write(path: Path, *objects: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(objects))
    return path


def test_cli_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, slices = slices_of(DUAL)
    slices_file = write(tmp_path / "slices.yaml", *slices)
    args = ["explain", "--class", str(CLASSES), "--slices", str(slices_file), "-o", "json"]
    claims = EXPLAIN / "claims.yaml"

    assert main([*args, "--claim", str(claims), "--claim-name", "numa0-cpus"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["satisfiable"] is True
    [numa0] = out["requests"]
    assert numa0["name"] == "numa0-cpus"
    assert numa0["candidates"] == ["cpu-numa0"]
    assert set(numa0["reasons"]) == {
        "cpu-numa1",
        "hugepages-2mi-numa0",
        "hugepages-2mi-numa1",
        "memory-numa0",
        "memory-numa1",
    }

    assert main([*args, "--claim", str(claims), "--claim-name", "cpus-10"]) == 1
    assert json.loads(capsys.readouterr().out)["satisfiable"] is False

    in_use = write(tmp_path / "in-use.yaml", allocated("big", "cpu-numa0", "7"), allocated("b", "cpu-numa1", "7"))
    assert main([*args, "--claim", str(claims), "--claim-name", "cpus-4", "--claims-in-use", str(in_use)]) == 1
    reasons = json.loads(capsys.readouterr().out)["requests"][0]["reasons"]
    assert reasons["cpu-numa0"] == "dra.cpu/cpu: requests 4, only 0 of 7 free (team/big hold 7)"
    assert reasons["cpu-numa1"] == "dra.cpu/cpu: requests 4, only 1 of 8 free (team/b hold 7)"

    # As docs/user.md writes it: the claim file as the first argument.
    assert main(["explain", str(claims), "--claim-name", "numa0-cpus", *args[1:]]) == 0
    assert json.loads(capsys.readouterr().out)["satisfiable"] is True
    assert main([*args]) == 2
    assert "give one claim file: dra-cpu explain CLAIM.yaml --slices FILE" in capsys.readouterr().err

    typo = write(tmp_path / "typo.yaml", cpus_claim("1", 'device.attributes["dra.cpu"].numaNodeID === 0'))
    assert main([*args, "--claim", str(typo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "dra-cpu explain: request cpus selectors[0]: CEL syntax error at line 1, column 43: unexpected character '='"
    )

    assert main([*args, "--claim", str(claims)]) == 2
    assert "expected one ResourceClaim or ResourceClaimTemplate, found ResourceClaim cpus-4" in capsys.readouterr().err


def test_cli_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, slices = slices_of(DUAL)
    slices_file = write(tmp_path / "slices.yaml", *slices)
    claim = EXPLAIN / "claims.yaml"
    argv = ["explain", "--claim", str(claim), "--claim-name", "cpus-and-hugepages", "--class", str(CLASSES)]
    assert main([*argv, "--slices", str(slices_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ResourceClaim cpus-and-hugepages: satisfiable on node node-a"
    assert "  => cpus: cpu-numa0" in out
    assert "  => hugepages: hugepages-2mi-numa0" in out
    assert any(line.split()[:2] == ["hugepages-2mi-numa0", "fits"] for line in out)


def test_without_class_the_charts_device_classes_are_assumed_and_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, slices = slices_of(FIXTURES / "sysfs" / "multi-l3-per-node")
    slices_file = write(tmp_path / "slices.yaml", *slices)
    claim = EXAMPLES / "claim-cpu-capacity-20.yaml"
    assert main(["explain", "--claim", str(claim), "--slices", str(slices_file), "-o", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["satisfiable"] is True
    assert captured.err == (
        "explain: no --class given: assuming the DeviceClasses the dra-cpu chart installs "
        "(dra.cpu, dra.cpu.isolated, dra.hugepages-2mi, dra.hugepages-1gi, dra.cpu.memory)\n"
    )
    # A class the chart does not install is still reported as missing, naming the ones assumed.
    other = cpus_claim("1")
    other["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] = "gpu.example.com"
    assert main(["explain", "--claim", str(write(tmp_path / "c.yaml", other)), "--slices", str(slices_file)]) == 1
    assert "DeviceClass 'gpu.example.com' not found (dra.cpu, dra.cpu.isolated" in capsys.readouterr().out


def test_bad_input_names_the_field(tmp_path: Path) -> None:
    claim = cpus_claim("1")
    claim["spec"]["devices"]["requests"][0]["exactly"]["count"] = 0
    with pytest.raises(
        Exception, match=r"claim: spec.devices.requests\[0\].exactly.count must be a positive integer, not 0"
    ):
        parse_claim(claim, "claim")
    _, slices = slices_of(DUAL)
    broken = copy.deepcopy(slices[0])
    broken["spec"]["devices"][0]["capacity"]["dra.cpu/cpu"]["value"] = "eight"
    with pytest.raises(
        Exception, match=r"ResourceSlice node-a-dra.cpu-0: spec.devices\[0\].capacity.dra.cpu/cpu.value"
    ):
        parse_slices([broken], "s.yaml")


@pytest.mark.parametrize("amount", ["-4", "0", "-1e-999999"])
def test_a_capacity_request_that_is_not_positive_is_an_input_error(amount: str) -> None:
    with pytest.raises(
        ExplainInputError,
        match=rf"claim: spec.devices.requests\[0\].exactly.capacity.requests.dra.cpu/cpu must be a positive quantity, "
        rf"not '{amount}'",
    ):
        parse_claim(cpus_claim(amount), "claim")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (yaml.safe_dump(cpus_claim("1e999999999")).encode(), "(out of range: its magnitude must be at most 2^63-1)"),
        (yaml.safe_dump(cpus_claim("9" * 100_000)).encode(), "(longer than 64 characters)"),
        (b"kind: ResourceClaim\nmetadata: {name: \xe9}\n", "is not UTF-8 text: byte b'\\xe9' at offset 37"),
        (b"kind: ResourceClaim\nspec: " + b"1" * 5000 + b"\n", "holds a value YAML cannot build"),
    ],
    ids=["huge-exponent", "huge-digits", "not-utf8", "5000-digit-int"],
)
def test_hostile_claim_files_are_one_line_and_exit_2(
    tmp_path: Path, content: bytes, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, slices = slices_of(DUAL)
    claim = tmp_path / "claim.yaml"
    claim.write_bytes(content)
    argv = [
        "explain",
        "--claim",
        str(claim),
        "--class",
        str(CLASSES),
        "--slices",
        str(write(tmp_path / "s.yaml", *slices)),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dra-cpu explain: ") and err.count("\n") == 1 and len(err) < 400, err
    assert expected in err


EXAMPLE_CLAIMS = [
    (path, obj)
    for path in sorted(EXAMPLES.rglob("*.yaml"))
    for obj in load_objects(path)
    if obj.get("kind") in ("ResourceClaim", "ResourceClaimTemplate")
]


def capacity_oracle(amount: int) -> Callable[[Topology], list[str]]:
    """cpu-capacity claims: any NUMA node with that many shared CPUs."""
    return lambda topology: [f"cpu-numa{n}" for n, count in shared_cpus(topology).items() if count >= amount]


def shared_by_group(topology: Topology, group_by: GroupBy) -> dict[str, int]:
    """Device name -> CPUs a dra.cpu claim may get there, for socket and machine devices, from the topology."""
    available = allocatable_cpus(topology, DeviceConfig(node_name="node-a")) - topology.isolated_cpus
    if group_by is GroupBy.MACHINE:
        return {"cpu-machine": len(available)}
    sockets: dict[str, int] = {}
    for cpu in available:
        name = f"cpu-socket{topology.cpu(cpu).socket}"
        sockets[name] = sockets.get(name, 0) + 1
    return sockets


# Expected candidates of the first request, from the topology, for the example claims whose intent is known.
EXAMPLE_ORACLES: dict[str, Callable[[Topology], list[str]]] = {
    "claim-cpu-capacity-4": capacity_oracle(4),
    "claim-cpu-capacity-10": capacity_oracle(10),
    # Two requests of 10, one per NUMA node (the upstream example): the first wants node 0.
    "claim-cpu-capacity-20": lambda t: ["cpu-numa0"] if shared_cpus(t).get(0, 0) >= 10 else [],
    # numa-bench: 4 CPUs on NUMA node 0 with 3 GiB of 2 MiB pages beside them (aligned) or on node 1 (misaligned).
    "numa-bench-aligned": lambda t: ["cpu-numa0"] if shared_cpus(t).get(0, 0) >= 4 else [],
    "numa-bench-misaligned": lambda t: ["cpu-numa0"] if shared_cpus(t).get(0, 0) >= 4 else [],
}


@pytest.mark.parametrize("group_by", list(GroupBy))
@pytest.mark.parametrize(
    ("path", "obj"), EXAMPLE_CLAIMS, ids=[f"{p.name}:{o['metadata']['name']}" for p, o in EXAMPLE_CLAIMS]
)
def test_every_example_claim_on_every_fixture(
    path: Path, obj: dict[str, Any], sysfs_fixture: Path, group_by: GroupBy
) -> None:
    name = obj["metadata"]["name"]
    gpu = name == "claim-cpu-gpu-pcie-root"
    topology, slices = slices_of(sysfs_fixture, group_by=group_by, pcie_roots=gpu)
    if gpu:
        slices += GPU_SLICES
    result = run(obj, slices, extra_classes=GPU_CLASSES if gpu else ())
    # With a second driver's pool, explain names devices pool/device.
    prefix = "node-a/" if gpu else ""
    devices = {prefix + d["name"] for s in slices for d in s["spec"]["devices"]}
    for req in result.as_dict()["requests"]:
        # Every device is accounted for: a candidate, or a reason why not.
        assert set(req["candidates"]) | set(req["reasons"]) == devices
        if result.satisfiable:
            assert set(req["allocated"]["devices"]) <= set(req["candidates"])
    if not result.satisfiable:
        assert result.reason
    if gpu:
        # Only the expander capture has a PCIe root beside a GPU's: the GPU on pci0000:20 (node 1) with the CPU device
        # over node 1; the one on pci0000:30 (node 2, no CPUs) has no CPU device beside it.
        if sysfs_fixture.name == "pcie-expander-3numa":
            cpu = {"numanode": "cpu-numa1", "socket": "cpu-socket1", "machine": "cpu-machine"}[group_by.value]
            assert [r["allocated"]["devices"] for r in result.as_dict()["requests"]] == [
                [f"node-a/{cpu}"],
                ["node-a/gpu-1"],
            ]
        elif max(shared_cpus(topology).values()) < 2:
            # A node of 2 CPUs publishes 1 (one stays shared): the claim's 2 CPUs fit nowhere.
            assert not result.satisfiable and "cpus: needs 1 device(s); 0 pass" in result.reason
        else:
            assert not result.satisfiable
            assert "matchAttribute resource.kubernetes.io/pcieRoot over cpus, gpu: a device lacks the attribute" in (
                result.reason
            )
    oracle = EXAMPLE_ORACLES.get(name)
    if oracle is not None and group_by is GroupBy.NUMA_NODE:
        assert result.as_dict()["requests"][0]["candidates"] == oracle(topology)
    amount = {"claim-cpu-capacity-4": 4, "claim-cpu-capacity-10": 10}.get(name)
    if amount is not None and group_by is not GroupBy.NUMA_NODE:
        # Upstream's plain capacity claims: any socket (or the machine) with room, by explain as by the topology.
        expected = [d for d, count in shared_by_group(topology, group_by).items() if count >= amount]
        assert result.as_dict()["requests"][0]["candidates"] == expected
        assert result.satisfiable == bool(expected)
    if obj["metadata"]["name"].startswith("numa-bench"):
        # No capture has 3 GiB of 2 MiB pages on one node: the hugepages request is why the pod would stay Pending;
        # on a device over several NUMA nodes it is already the NUMA selector (no NUMA attribute to compare).
        assert not result.satisfiable
        assert "hugepages:" in result.reason or "attribute dra.cpu/numaNodeID is missing" in result.reason


def test_a_namespace_that_is_not_a_string_is_described_not_a_type_error() -> None:
    claim = cpus_claim("1")
    claim["metadata"]["namespace"] = 7
    assert describe(claim) == "ResourceClaim 7/c"
    assert describe({"kind": "ResourceClaim", "metadata": {"name": "n" * 10_000}}).endswith("...")


def _pool(driver: str, devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A slice of `driver` on node-a whose devices carry the given attributes."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"node-a-{driver}"},
        "spec": {
            "driver": driver,
            "nodeName": "node-a",
            "pool": {"name": f"node-a-{driver}", "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": name, "attributes": attributes} for name, attributes in devices.items()],
        },
    }


def _class(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{name}"'}}]},
    }


def _claim_over(drivers: Sequence[str], constraint: str = "matchAttribute") -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "c"},
        "spec": {
            "devices": {
                "requests": [{"name": d.split(".")[0], "exactly": {"deviceClassName": d}} for d in drivers],
                "constraints": [{constraint: "resource.kubernetes.io/pcieRoot"}],
            }
        },
    }


def _roots(*values: Any) -> dict[str, dict[str, Any]]:
    """Devices dev-0, dev-1, ... with pcieRoot values: a tuple is a list attribute, an int an `int`."""
    out = {}
    for i, value in enumerate(values):
        if isinstance(value, tuple):
            attr: dict[str, Any] = {"strings": list(value)}
        else:
            attr = {"int": value} if isinstance(value, int) else {"string": value}
        out[f"dev-{i}"] = {"resource.kubernetes.io/pcieRoot": attr}
    return out


@pytest.mark.parametrize(
    ("cpu", "gpu", "nic", "allocated"),
    [
        # A list matches a string it holds; the scheduler takes the first combination that fits.
        (("pci0000:00", "pci0000:10"), "pci0000:10", "pci0000:10", ["dev-0", "dev-0", "dev-0"]),
        # Every device must share one element: the GPU's root and the NIC's differ, though the CPU holds both.
        (("pci0000:00", "pci0000:10"), "pci0000:00", "pci0000:10", None),
        # Set semantics: order and duplicates do not matter.
        (("pci0000:10", "pci0000:00", "pci0000:10"), "pci0000:00", ("pci0000:00",), ["dev-0", "dev-0", "dev-0"]),
        # Values of different kinds never match, even when they print alike.
        (("7",), 7, 7, None),
    ],
    ids=["common-root", "no-root-common-to-all", "set-semantics", "kinds-differ"],
)
def test_match_attribute_over_lists_needs_an_element_common_to_every_device(
    cpu: Any, gpu: Any, nic: Any, allocated: list[str] | None
) -> None:
    """k8s.io/dynamic-resource-allocation@v0.37.2 structured/internal/experimental matchAttributeConstraint: each
    value a set (a scalar one of one element), the running intersection over the devices must stay non-empty."""
    slices = [_pool("cpu.example", _roots(cpu)), _pool("gpu.example", _roots(gpu)), _pool("nic.example", _roots(nic))]
    classes = [_class(d) for d in ("cpu.example", "gpu.example", "nic.example")]
    result = run(_claim_over(["cpu.example", "gpu.example", "nic.example"]), slices, extra_classes=classes)
    if allocated is None:
        assert not result.satisfiable
        assert "matchAttribute resource.kubernetes.io/pcieRoot over all requests" in result.reason
    else:
        assert result.satisfiable, result.reason
        got = [r["allocated"]["devices"][0].rsplit("/", 1)[1] for r in result.as_dict()["requests"]]
        assert got == allocated


def test_match_attribute_picks_the_gpu_that_shares_a_root_and_reports_the_lists() -> None:
    slices = [
        _pool("cpu.example", _roots(("pci0000:00", "pci0000:10"), ("pci0000:00", "pci0000:20"))),
        _pool("gpu.example", _roots("pci0000:30", "pci0000:20")),
    ]
    classes = [_class("cpu.example"), _class("gpu.example")]
    result = run(_claim_over(["cpu.example", "gpu.example"]), slices, extra_classes=classes)
    assert [r["allocated"]["devices"] for r in result.as_dict()["requests"]] == [
        ["node-a-cpu.example/dev-1"],
        ["node-a-gpu.example/dev-1"],
    ]
    lone = [_pool("cpu.example", _roots(("pci0000:00", "pci0000:10"))), _pool("gpu.example", _roots("pci0000:30"))]
    result = run(_claim_over(["cpu.example", "gpu.example"]), lone, extra_classes=classes)
    assert not result.satisfiable
    assert "cpu offers [pci0000:00, pci0000:10]; gpu offers pci0000:30" in result.reason


@pytest.mark.parametrize(
    ("first", "second", "ok"),
    [
        (("pci0000:00", "pci0000:10"), ("pci0000:20",), True),
        (("pci0000:00", "pci0000:10"), ("pci0000:10", "pci0000:20"), False),
        (("pci0000:00", "pci0000:10"), "pci0000:00", False),
        (("7",), 7, True),
    ],
    ids=["disjoint", "overlap", "list-and-scalar", "kinds-differ"],
)
def test_distinct_attribute_over_lists_needs_them_pairwise_disjoint(first: Any, second: Any, ok: bool) -> None:
    """distinctAttributeConstraint: no element shared by two devices; values of different kinds are disjoint."""
    slices = [_pool("cpu.example", _roots(first)), _pool("gpu.example", _roots(second))]
    classes = [_class("cpu.example"), _class("gpu.example")]
    result = run(_claim_over(["cpu.example", "gpu.example"], "distinctAttribute"), slices, extra_classes=classes)
    assert result.satisfiable == ok, result.reason


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ({"strings": []}, "attributes.resource.kubernetes.io/pcieRoot.strings must be a non-empty list, not []"),
        ({"strings": ["a", 1]}, "attributes.resource.kubernetes.io/pcieRoot.strings[1] must be a string, not 1"),
        ({"ints": [True]}, "pcieRoot.ints[0] must be a int, not True"),
        ({"versions": ["1.x"]}, "pcieRoot.versions[0] must be a semver, not '1.x'"),
        ({"string": "a", "strings": ["a"]}, "must hold exactly one of bool, int, string, version or a list"),
    ],
)
def test_bad_list_attributes_are_one_clear_error(attribute: dict[str, Any], message: str) -> None:
    obj = _pool("gpu.example", {"dev-0": {"resource.kubernetes.io/pcieRoot": attribute}})
    with pytest.raises(ExplainInputError, match=re.escape(message)):
        parse_slices([obj], "slices")


def test_the_gpu_example_as_its_comment_runs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dra-cpu slices --publish-pcie-roots` on the expander capture plus the GPU driver's slice and class: explain
    pairs cpu-numa1 with gpu-1 (both on pci0000:20); the chart's classes fill in dra.cpu and say so."""
    folder = tmp_path / "slices"
    folder.mkdir()
    root = FIXTURES / "sysfs" / "pcie-expander-3numa"
    argv = ["slices", "--node-name", "node-a", "--publish-pcie-roots", "--sysfs-root", str(root)]
    assert main(argv) == 0
    (folder / "cpu.yaml").write_text(capsys.readouterr().out)
    gpu = EXAMPLES / "pcie-root" / "gpu-example-com.yaml"
    (folder / "gpu.yaml").write_text(gpu.read_text())
    claim = EXAMPLES / "claim-cpu-gpu-pcie-root.yaml"
    assert main(["explain", "--claim", str(claim), "--slices", str(folder), "--class", str(gpu)]) == 0
    captured = capsys.readouterr()
    assert "  => cpus: node-a/cpu-numa1" in captured.out.splitlines()
    assert "  => gpu: node-a/gpu-1" in captured.out.splitlines()
    assert captured.err == (
        "explain: assuming the dra-cpu chart's DeviceClasses the --class files lack "
        "(dra.cpu, dra.cpu.isolated, dra.hugepages-2mi, dra.hugepages-1gi, dra.cpu.memory)\n"
    )
    # Without publishPcieRoots our CPU devices have no pcieRoot: the constraint cannot hold, and explain says why.
    assert main(["slices", "--node-name", "node-a", "--sysfs-root", str(root)]) == 0
    (folder / "cpu.yaml").write_text(capsys.readouterr().out)
    assert main(["explain", "--claim", str(claim), "--slices", str(folder), "--class", str(gpu)]) == 1
    out = capsys.readouterr().out
    assert "matchAttribute resource.kubernetes.io/pcieRoot over cpus, gpu: a device lacks the attribute" in out
