"""Fuzz targets for the parsers of everything that comes from outside: quantities, CPU lists, CEL selectors, claims
as the driver reads them (alone, and several in one NodePrepareResources call through the real servicer), the pods
they are reserved for, the config file, and the files `dra-cpu explain` reads.
Shared by tests/fuzz (a CI-sized pass) and hack/bench/fuzz.py (as many examples as asked for).

Each target takes one input and must end in a value or a DraCpuError subclass within its time bound: any other
exception, or a slower answer, is a crash. `tests/fuzz/corpus/<target>/` holds the hostile inputs found by hand or
by earlier runs; every one of them is replayed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from dra_cpu.cli import build_parser
from dra_cpu.config import load
from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.claims import ClaimRef, allocated_claim_object, allocation_result
from dra_cpu.core.claims import parse_claim as parse_driver_claim
from dra_cpu.core.cpu_quota import throttled
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import Device, DeviceConfig, build_devices, build_slices
from dra_cpu.core.grant import grant
from dra_cpu.core.ledger import Ledger
from dra_cpu.core.memory_limit import BoundMemory, unbounded
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.core.quantity import parse_quantity
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError
from dra_cpu.kubelet.dra import DRAService
from dra_cpu.kubelet.gen import dra_v1_pb2
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.cel.library import CelDevice, environment
from dra_cpu.tools.cel.selector import compile_selector
from dra_cpu.tools.explain.inputs import load_objects, of_kind
from dra_cpu.tools.explain.parse import parse_claim, parse_class, parse_slices, parse_usage
from dra_cpu.tools.explain.search import explain
from tests.harness.nodes.standin import make_driver, write_claim
from tests.harness.paths import EXAMPLES, FIXTURES, REPO

CORPUS = REPO / "tests" / "fuzz" / "corpus"
# celpy raises the recursion limit when its environment is built: now, rather than in the middle of a test.
environment()
DRIVER, NODE = "dra.cpu", "node-a"
UID = "4f6c1a2e-9b1d-4c5e-8f00-0123456789ab"
PREPARE_UID = "4f6c1a2e-9b1d-4c5e-8f00-00000000900d"


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    run: Callable[[Any], object]
    # The time bound of one input: generous, for 2 busy cores; a hang or a runaway takes far longer.
    seconds: float
    # A corpus file's bytes -> the target's input.
    from_file: Callable[[bytes], Any]

    def corpus(self) -> list[tuple[str, Any]]:
        folder = CORPUS / self.name
        return [(p.name, self.from_file(p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]


def crash(target: Target, value: Any) -> str:
    """ "" when the target ends in a value or a DraCpuError within its time bound; else what went wrong."""
    started = time.monotonic()
    try:
        target.run(value)
    except DraCpuError:
        pass
    except Exception as err:  # anything else is what the fuzzer looks for
        return f"{type(err).__name__}: {str(err)[:200]}"
    elapsed = time.monotonic() - started
    if elapsed > target.seconds:
        return f"took {elapsed:.1f} s, more than {target.seconds} s"
    return ""


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _yaml(data: bytes) -> Any:
    return yaml.safe_load(data)


# Plain data as YAML and JSON give it, with the awkward leaves a file may hold.
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["-4", "0", "1e999999999", "1e-999999", "9" * 80, "8Ei", "0-99999999", "..", "a/b", "\n"])
)
JSON = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

QUANTITIES = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"[+-]?\d{0,30}(\.\d{0,12})?([eE][+-]?\d{1,12}|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?", fullmatch=True),
    st.integers(),
)
CPU_LISTS = st.one_of(
    st.text(alphabet="0123456789-, \n", max_size=60),
    st.from_regex(r"(\d{1,9}(-\d{1,9})?,){0,5}\d{1,9}", fullmatch=True),
    st.text(max_size=30),
)


def _cel(leaf: str) -> st.SearchStrategy[str]:
    def grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        pair = st.tuples(inner, inner)
        return st.one_of(
            pair.map(lambda p: f"({p[0]} && {p[1]})"),
            pair.map(lambda p: f"({p[0]} || {p[1]})"),
            pair.map(lambda p: f"{p[0]} == {p[1]}"),
            pair.map(lambda p: f"{p[0]} + {p[1]}"),
            pair.map(lambda p: f"{p[0]} < {p[1]}"),
            inner.map(lambda e: f"!{e}"),
            inner.map(lambda e: f"-{e}"),
            inner.map(lambda e: f"size({e})"),
            inner.map(lambda e: f"quantity({e})"),
            inner.map(lambda e: f"semver({e})"),
            pair.map(lambda p: f"{p[0]}.compareTo({p[1]})"),
            st.tuples(st.sampled_from(["all", "exists", "map", "filter", "exists_one"]), inner, inner).map(
                lambda t: f"{t[1]}.{t[0]}(x, {t[2]})"
            ),
            st.lists(inner, max_size=4).map(lambda items: f"[{', '.join(items)}]"),
        )

    leaves = st.sampled_from(
        [
            "device.driver",
            'device.attributes["dra.cpu"].numaNodeID',
            'device.capacity["dra.cpu"].cpu',
            "device.allowMultipleAllocations",
            "x",
            "1",
            "-1",
            "1u",
            "2.5",
            '"dra.cpu"',
            '"1e999999999"',
            "true",
            "null",
            "[1, 2, 3]",
            '{"a": 1}',
            leaf,
        ]
    )
    return st.recursive(leaves, grow, max_leaves=25)


CEL = st.one_of(_cel('quantity("1")'), st.text(max_size=60), st.text(alphabet='()[]!&|.,"x1 ', max_size=80))
CEL_DEVICE = CelDevice(DRIVER, {"dra.cpu/numaNodeID": 0, "dra.cpu/cpuModel": "x"}, {"dra.cpu/cpu": Fraction(8)}, True)


def run_quantity(text: str | int) -> object:
    return parse_quantity(text)


def run_cpulist(text: str) -> object:
    return CPUSet.parse(text)


def run_cel(expression: str) -> object:
    return compile_selector(expression, "fuzz").evaluate(CEL_DEVICE)


@cache
def _node() -> tuple[Topology, dict[str, Device], list[dict[str, Any]]]:
    topology = read_topology(FIXTURES / "sysfs" / "dual-socket-smt2")
    config = DeviceConfig(node_name=NODE, driver_name=DRIVER)
    devices = build_devices(topology, config)
    return topology, {d.name: d for d in devices}, build_slices(devices, config)


def _result() -> st.SearchStrategy[dict[str, Any]]:
    quantity = QUANTITIES | JSON
    return st.builds(
        lambda device, consumed, extra: (
            allocation_result(
                DRIVER, NODE, device, consumed={"dra.cpu/cpu": consumed} if consumed is not None else None
            )
            | extra
        ),
        st.sampled_from(["cpu-numa0", "cpu-numa1", "hugepages-2mi-numa0", "nope"]),
        quantity.map(lambda q: q if isinstance(q, str) else str(q)) | st.none(),
        st.dictionaries(
            st.sampled_from(["request", "driver", "pool", "consumedCapacity", "shareID"]), JSON, max_size=2
        ),
    )


CLAIMS = st.one_of(
    st.builds(
        lambda results, config, uid, extra: (
            allocated_claim_object("default", "c", results, uid=uid, config=config) | extra
        ),
        st.lists(_result(), max_size=3),
        st.lists(
            st.builds(
                lambda params: {"opaque": {"driver": DRIVER, "parameters": params}},
                st.fixed_dictionaries(
                    {"apiVersion": st.just("dra.cpu/v1alpha1") | JSON, "kind": st.just("CPUConfig") | JSON},
                    optional={"wholeCores": JSON, "alignL3": JSON, "spread": JSON},
                ),
            )
            | st.dictionaries(st.sampled_from(["opaque", "requests", "source"]), JSON, max_size=3),
            max_size=2,
        ),
        st.just(UID) | st.text(max_size=10),
        st.dictionaries(st.sampled_from(["metadata", "status", "spec"]), JSON, max_size=1),
    ),
    JSON,
)


def run_claim(obj: Any) -> object:
    """What the driver does with a claim it reads: parse it, then decide the CPUs on a two-node machine."""
    if not isinstance(obj, dict):
        obj = {"metadata": obj}
    ref = ClaimRef("default", "c", UID)
    request = parse_driver_claim(obj, ref, driver=DRIVER, pool=NODE, default_policy=AllocationPolicy())
    topology, devices, _ = _node()
    view = NodeView(topology, tuple(devices.values()), NodeSettings(DeviceConfig(node_name=NODE, driver_name=DRIVER)))
    return grant(Ledger(), request, view)


@cache
def _prepare_node() -> tuple[DRAService, Path]:
    """The real servicer over the real Driver on dual-socket-smt2, with a standalone folder for the cluster; one per
    process (each input unprepares what it prepared)."""
    root = Path(tempfile.mkdtemp(prefix="dra-cpu-fuzz-prepare-"))
    (root / "state").mkdir()
    driver = make_driver(root, "dual-socket-smt2", metadata=True)
    driver.start()
    return DRAService(driver, dra_v1_pb2), root


def _claims_request(pb2: Any, refs: list[ClaimRef]) -> list[Any]:
    return [pb2.Claim(namespace=r.namespace, name=r.name, uid=r.uid) for r in refs]


def run_prepare(claims: Any) -> object:
    """NodePrepareResources through the real servicer, in one request: a good claim, then the fuzzed ones. The call
    never fails as a whole (that would be status UNKNOWN for every claim): each claim ends prepared or with an error
    of its own, and the good claim is prepared."""
    service, root = _prepare_node()
    good = write_claim(root, PREPARE_UID, [allocation_result(DRIVER, NODE, "cpu-numa1", consumed={"dra.cpu/cpu": "1"})])
    refs = [good]
    for i, obj in enumerate(claims if isinstance(claims, list) else [claims]):
        ref = ClaimRef("default", f"fuzzed-{i}", f"4f6c1a2e-9b1d-4c5e-8f00-{i:012d}")
        metadata = obj.get("metadata") if isinstance(obj, dict) else None
        if isinstance(metadata, dict) and metadata.get("uid") == UID:
            metadata["uid"] = ref.uid  # as the API server would: the claim the kubelet names
        path = root / "cluster/resourceclaims/default" / f"{ref.name}.yaml"
        path.write_text(yaml.safe_dump(obj))
        refs.append(ref)
    try:
        response = service.NodePrepareResources(
            dra_v1_pb2.NodePrepareResourcesRequest(claims=_claims_request(dra_v1_pb2, refs)), None
        )
    finally:
        service.NodeUnprepareResources(
            dra_v1_pb2.NodeUnprepareResourcesRequest(claims=_claims_request(dra_v1_pb2, refs)), None
        )
    assert set(response.claims) == {r.uid for r in refs}, "every claim has its own answer"
    assert response.claims[good.uid].error == "", response.claims[good.uid].error
    return response


def _container() -> st.SearchStrategy[Any]:
    resources = st.fixed_dictionaries(
        {},
        optional={
            "claims": st.lists(st.fixed_dictionaries({"name": st.just("cpus") | JSON}) | JSON, max_size=2) | JSON,
            "limits": st.fixed_dictionaries({}, optional={"cpu": QUANTITIES | JSON}) | JSON,
        },
    )
    return st.fixed_dictionaries({"name": st.just("app") | JSON}, optional={"resources": resources | JSON}) | JSON


PODS = st.one_of(
    st.fixed_dictionaries(
        {
            "metadata": st.just({"namespace": "default", "name": "p"}) | JSON,
            "spec": st.fixed_dictionaries(
                {
                    "resourceClaims": st.lists(
                        st.fixed_dictionaries(
                            {"name": st.just("cpus") | JSON},
                            optional={"resourceClaimName": st.just("c") | JSON, "resourceClaimTemplateName": JSON},
                        )
                        | JSON,
                        max_size=2,
                    )
                    | JSON,
                    "containers": st.lists(_container(), max_size=2) | JSON,
                },
                optional={"initContainers": st.lists(_container(), max_size=1) | JSON, "resources": JSON},
            )
            | JSON,
        },
        optional={
            "status": st.fixed_dictionaries(
                {},
                optional={"resourceClaimStatuses": JSON, "nodeAllocatableResourceClaimStatuses": JSON},
            )
            | JSON
        },
    ),
    JSON,
)


def run_pod(obj: Any) -> object:
    """The limit checks prepare runs on a pod the claim `c` (2 CPUs, 64 MiB bound to NUMA node 0) is reserved for."""
    pod = obj if isinstance(obj, dict) else {"spec": obj}
    return throttled(pod, "c", 2) + unbounded(pod, "c", BoundMemory(64 << 20, CPUSet.of([0])))


CONFIG_KEYS = [
    "hugepagePollSeconds",
    "minSharedCpus",
    "reservedCpus",
    "reservedMemory",
    "kubeletRootDir",
    "nriPluginIndex",
    "deviceMode",
    "wholeCores",
    "driverName",
    "enforcement",
]
SPECIAL = st.sampled_from([".nan", ".inf", "-.inf", "1" + "0" * 400, "1" * 5000, "0-99999999", "relative/dir"])
CONFIGS = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=4).map(lambda d: yaml.safe_dump(d).encode()),
    st.tuples(st.sampled_from(CONFIG_KEYS), SPECIAL).map(lambda kv: f"{kv[0]}: {kv[1]}\n".encode()),
)


@contextmanager
def _in_file(data: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dra-cpu-fuzz-") as tmp:
        path = Path(tmp) / "input.yaml"
        path.write_bytes(data)
        yield path


def run_config(data: bytes) -> object:
    with _in_file(data) as path:
        return load(build_parser().parse_args(["run", "--config", str(path)]), {"NODE_NAME": "n"})


@cache
def _classes() -> dict[str, Any]:
    classes = [parse_class(o, "classes") for o in load_objects(FIXTURES / "explain" / "classes.yaml")]
    return {c.name: c for c in classes}


def _explain_claim(requests: list[Any]) -> dict[str, Any]:
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "c"},
            "spec": {"devices": {"requests": requests}}}  # fmt: skip


EXPLAIN_REQUEST = st.builds(
    lambda amount, selectors, extra: {
        "name": "cpus",
        "exactly": {
            "deviceClassName": "dra.cpu",
            "capacity": {"requests": {"dra.cpu/cpu": amount}},
            "selectors": [{"cel": {"expression": s}} for s in selectors],
        }
        | extra,
    },
    QUANTITIES | JSON,
    st.lists(_cel('device.attributes["dra.cpu"].numaNodeID'), max_size=2),
    st.dictionaries(st.sampled_from(["count", "allocationMode", "capacity", "tolerations"]), JSON, max_size=1),
)
EXPLAIN_FILES = st.one_of(
    st.lists(EXPLAIN_REQUEST | JSON, min_size=1, max_size=2).map(lambda r: yaml.safe_dump(_explain_claim(r)).encode()),
    st.binary(max_size=200),
    JSON.map(lambda obj: yaml.safe_dump({"kind": "ResourceSlice", "spec": obj}).encode()),
)


def run_explain(data: bytes) -> object:
    """`dra-cpu explain --claim FILE --slices FILE`: every claim and slice of the file, against a two-node machine."""
    with _in_file(data) as path:
        objects = load_objects(path)
        _, _, slices = _node()
        devices = parse_slices([*slices, *of_kind(objects, "ResourceSlice")], str(path))
        usage = parse_usage(of_kind(objects, "ResourceClaim"), str(path), skip="ResourceClaim c")
        return [
            explain(parse_claim(obj, str(path)), _classes(), devices, usage)
            for obj in of_kind(objects, "ResourceClaim", "ResourceClaimTemplate")
        ]


def _example_bytes() -> list[bytes]:
    return [p.read_bytes() for p in sorted(EXAMPLES.rglob("*.yaml"))]


TARGETS = (
    Target("quantity", QUANTITIES, run_quantity, 3.0, _text),
    Target("cpulist", CPU_LISTS, run_cpulist, 3.0, _text),
    Target("cel", CEL, run_cel, 15.0, _text),
    Target("claim", CLAIMS, run_claim, 5.0, _yaml),
    Target("prepare", st.lists(CLAIMS, min_size=1, max_size=2), run_prepare, 10.0, _yaml),
    Target("pod", PODS, run_pod, 5.0, _yaml),
    Target("config", CONFIGS, run_config, 5.0, bytes),
    Target("explain", EXPLAIN_FILES | st.sampled_from(_example_bytes()), run_explain, 15.0, bytes),
)


def target(name: str) -> Target:
    return next(t for t in TARGETS if t.name == name)
