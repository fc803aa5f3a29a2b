"""Device metadata (KEP-5304) through the real kubelet socket: the file a prepared claim's containers read, the CDI
spec that mounts it, the id in the prepare answer, and its removal at unprepare and at a restart."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.device_metadata import CONTAINER_DIR, MetadataError
from dra_cpu.kubelet.client import KubeletClient
from dra_cpu.store.metadata_files import decode, pretty_json
from tests.harness.claims import DRIVER, NODE, result
from tests.harness.nodes.standin import NodeFactory, StandinNode, make_driver, start_plugin
from tests.harness.poll import wait_until

# Where the 1.37.2 kubeletplugin helper's own compatibility fixture lives, when the Go module cache is installed.
UPSTREAM_FIXTURE = Path(
    "/var/cache/dra-cpu-testenv/go/mod/k8s.io/dynamic-resource-allocation@v0.37.2/api/metadata/testdata/HEAD"
    "/metadata.json"
)


def metadata_dir(node: StandinNode) -> Path:
    return node.plugin.paths.plugin_dir / "dra-device-metadata"


def host_file(node: StandinNode, ref: ClaimRef, request: str = "cpus") -> Path:
    return metadata_dir(node) / f"{ref.uid}_{request}.json"


def metadata_spec(node: StandinNode, ref: ClaimRef, request: str = "cpus") -> Path:
    return node.driver.reconciler.cdi.root / f"{DRIVER}_metadata_{ref.uid}_{request}.json"


def objects(data: bytes) -> list[dict[str, Any]]:
    """The JSON stream split as a reader sees it: every object, each of which must end with a newline."""
    text, decoder, out, position = data.decode(), json.JSONDecoder(), [], 0
    while position < len(text):
        obj, position = decoder.raw_decode(text, position)
        assert text[position] == "\n"
        position += 1
        out.append(obj)
    return out


def published(node: StandinNode, name: str) -> dict[str, Any]:
    [device] = [d for d in node.driver.snapshot().view.devices if d.name == name]
    attributes: dict[str, Any] = device.to_api()["attributes"]
    return attributes


def test_a_prepared_claim_gets_its_metadata_file_spec_and_id(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa1", cpus=4)])
    response = node.prepare(ref)
    assert not response.error
    [device] = response.devices
    assert list(device.cdi_device_ids) == [f"{DRIVER}/cpu=claim-{ref.uid}", f"{DRIVER}/metadata={ref.uid}_cpus"]

    path = host_file(node, ref)
    data = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    # A JSON stream, newest version first, pretty-printed with two spaces as the Go helper's serializer does.
    assert data.startswith(b'{\n  "kind": "DeviceMetadata",\n  "apiVersion": "metadata.resource.k8s.io/v1beta1",\n')
    v1beta1, v1alpha1 = objects(data)
    assert v1alpha1 == {**v1beta1, "apiVersion": "metadata.resource.k8s.io/v1alpha1"}
    cpus = node.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"]
    assert v1beta1 == {
        "kind": "DeviceMetadata",
        "apiVersion": "metadata.resource.k8s.io/v1beta1",
        "metadata": {"name": ref.name, "namespace": "default", "uid": ref.uid, "generation": 1},
        "requests": [
            {
                "name": "cpus",
                "devices": [
                    {
                        "driver": DRIVER,
                        "pool": NODE,
                        "name": "cpu-numa1",
                        "attributes": {
                            **published(node, "cpu-numa1"),
                            "dra.cpu/allocatedNumCPUs": {"int": 4},
                            "dra.cpu/allocatedCPUs": {"string": str(cpus)},
                            "dra.cpu/allocatedMemoryNodes": {"string": "1"},
                        },
                    }
                ],
            }
        ],
    }
    # Decoded by the format's rules: the first version the reader knows, validated.
    assert decode(data) == v1beta1
    assert decode(data, versions=("v1alpha1",)) == v1alpha1

    spec = json.loads(metadata_spec(node, ref).read_text())
    assert spec == {
        "cdiVersion": "0.5.0",
        "kind": f"{DRIVER}/metadata",
        "devices": [
            {
                "name": f"{ref.uid}_cpus",
                "containerEdits": {
                    "mounts": [
                        {
                            "hostPath": str(path),
                            "containerPath": f"{CONTAINER_DIR}/resourceclaims/{ref.name}/cpus/{DRIVER}-metadata.json",
                            "options": ["ro", "bind"],
                        }
                    ]
                },
            }
        ],
    }


def test_template_claims_subrequests_and_hugepages(node_factory: NodeFactory) -> None:
    """A claim made from a pod's template is found under the pod's name for it; a firstAvailable subrequest keeps
    its full name in the file and its base name in paths; each request has its own file and id."""
    node = node_factory()
    ref = node.claim(
        [result("cpu-numa0", request="cpus/big", cpus=2), result("hugepages-2mi-numa0", request="mem", memory="4Mi")],
        annotations={"resource.kubernetes.io/pod-claim-name": "pinned"},
    )
    response = node.prepare(ref)
    assert not response.error
    ids = {d.device_name: list(d.cdi_device_ids) for d in response.devices}
    assert ids["cpu-numa0"][1:] == [f"{DRIVER}/metadata={ref.uid}_cpus"]
    assert ids["hugepages-2mi-numa0"][1:] == [f"{DRIVER}/metadata={ref.uid}_mem"]

    cpus = decode(host_file(node, ref, "cpus").read_bytes())
    assert cpus["podClaimName"] == "pinned"
    assert [r["name"] for r in cpus["requests"]] == ["cpus/big"]
    mem = decode(host_file(node, ref, "mem").read_bytes())
    [device] = mem["requests"][0]["devices"]
    assert device["attributes"]["dra.cpu/allocatedHugepagesBytes"] == {"int": 4 * 2**20}
    assert device["attributes"]["dra.cpu/allocatedMemoryNodes"] == {"string": "0"}
    mount = json.loads(metadata_spec(node, ref, "mem").read_text())["devices"][0]["containerEdits"]["mounts"][0]
    assert mount["containerPath"] == f"{CONTAINER_DIR}/resourceclaimtemplates/pinned/mem/{DRIVER}-metadata.json"


def test_unprepare_removes_the_files_and_specs(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa0", cpus=1)])
    assert not node.prepare(ref).error
    assert host_file(node, ref).is_file() and metadata_spec(node, ref).exists()
    assert node.kubelet.unprepare([ref]).claims[ref.uid].error == ""
    assert not metadata_spec(node, ref).exists()
    assert not any(metadata_dir(node).iterdir())


def test_unprepare_leaves_the_files_of_a_claim_made_again_under_the_same_name(node_factory: NodeFactory) -> None:
    node = node_factory()
    old = node.claim([result("cpu-numa0", cpus=1)], name="same", uid=str(uuid.uuid4()))
    assert not node.prepare(old).error
    # Deleted and made again before the kubelet unprepared the old one: both have files, by uid.
    new = node.claim([result("cpu-numa1", cpus=1)], name="same", uid=str(uuid.uuid4()))
    assert not node.prepare(new).error
    written = host_file(node, new).read_bytes()
    assert decode(written)["metadata"]["uid"] == new.uid

    assert node.kubelet.unprepare([old]).claims[old.uid].error == ""
    assert not metadata_spec(node, old).exists()
    assert host_file(node, new).read_bytes() == written and metadata_spec(node, new).is_file()

    assert node.kubelet.unprepare([new]).claims[new.uid].error == ""
    assert not host_file(node, new).exists() and not metadata_spec(node, new).exists()
    assert not any(metadata_dir(node).iterdir())


def test_a_restart_keeps_the_prepared_claims_metadata_and_drops_the_rest(node_factory: NodeFactory) -> None:
    node = node_factory()
    kept, dropped = node.claim([result("cpu-numa0", cpus=1)]), node.claim([result("cpu-numa1", cpus=1)])
    assert not node.prepare(kept).error and not node.prepare(dropped).error
    kept_file, kept_spec = host_file(node, kept).read_bytes(), metadata_spec(node, kept).read_bytes()
    # `dropped` is unprepared by the driver but its files stay (left by a driver that removed them after the
    # checkpoint entry, and crashed between the two); the CDI folder of `kept` is emptied (a reboot: it is a
    # tmpfs); a write was interrupted.
    left = {p: p.read_bytes() for p in (host_file(node, dropped), metadata_spec(node, dropped))}
    assert node.driver.unprepare([dropped]) == {dropped.uid: ""}
    for path, data in left.items():
        path.write_bytes(data)
    metadata_spec(node, kept).unlink()
    leftover = host_file(node, kept).with_name(f".{host_file(node, kept).name}.abcd1234.tmp")
    leftover.write_text("{")
    node.kubelet.close()
    node.plugin.stop()

    driver = make_driver(node.root, node.fixture)
    driver.start()
    plugin = start_plugin(driver, node.root)
    try:
        assert host_file(node, kept).read_bytes() == kept_file
        assert metadata_spec(node, kept).read_bytes() == kept_spec
        assert not leftover.exists()
        assert not host_file(node, dropped).exists()
        assert not metadata_spec(node, dropped).exists()
    finally:
        plugin.stop()


def test_a_restart_moves_the_files_of_the_helpers_layout_keeping_their_inode(node_factory: NodeFactory) -> None:
    """Files an earlier dra-cpu wrote as the kubeletplugin helper lays them out (`<namespace>_<claim>/<request>/
    metadata.json`): a prepared claim's is moved (running containers' bind mounts hold its inode) and its spec
    points at it; one of a claim no longer prepared goes, and so do the folders."""
    node = node_factory()
    kept, gone = node.claim([result("cpu-numa0", cpus=1)]), node.claim([result("cpu-numa1", cpus=1)])
    assert not node.prepare(kept).error and not node.prepare(gone).error
    gone_bytes = host_file(node, gone).read_bytes()
    assert node.driver.unprepare([gone]) == {gone.uid: ""}
    node.kubelet.close()
    node.plugin.stop()
    helper = {ref.uid: metadata_dir(node) / f"default_{ref.name}" / "cpus" / "metadata.json" for ref in (kept, gone)}
    for path in helper.values():
        path.parent.mkdir(parents=True)
    host_file(node, kept).rename(helper[kept.uid])
    helper[gone.uid].write_bytes(gone_bytes)
    kept_bytes, kept_inode = helper[kept.uid].read_bytes(), helper[kept.uid].stat().st_ino

    driver = make_driver(node.root, node.fixture)
    driver.start()
    plugin = start_plugin(driver, node.root)
    try:
        moved = host_file(node, kept)
        assert moved.read_bytes() == kept_bytes and moved.stat().st_ino == kept_inode
        [mount] = json.loads(metadata_spec(node, kept).read_text())["devices"][0]["containerEdits"]["mounts"]
        assert mount["hostPath"] == str(moved)
        assert sorted(p.name for p in metadata_dir(node).iterdir()) == [moved.name]
        assert not metadata_spec(node, gone).exists()
    finally:
        plugin.stop()


def test_turned_off_nothing_is_written_but_earlier_files_are_still_removed(node_factory: NodeFactory) -> None:
    node = node_factory()
    earlier = node.claim([result("cpu-numa0", cpus=1)])
    assert not node.prepare(earlier).error
    node.kubelet.close()
    node.plugin.stop()
    driver = make_driver(node.root, node.fixture, metadata=False)
    driver.start()
    plugin = start_plugin(driver, node.root)
    try:
        assert metadata_spec(node, earlier).exists(), "a prepared claim's containers may still start"
        kubelet = KubeletClient.register(plugin.paths.registration_socket)
        later = node.claim([result("cpu-numa1", cpus=1)])
        [device] = kubelet.prepare([later]).claims[later.uid].devices
        assert list(device.cdi_device_ids) == [f"{DRIVER}/cpu=claim-{later.uid}"]
        assert not host_file(node, later).exists()
        assert kubelet.unprepare([earlier]).claims[earlier.uid].error == ""
        assert not metadata_spec(node, earlier).exists() and not host_file(node, earlier).exists()
        kubelet.close()
    finally:
        plugin.stop()


def test_metadata_that_cannot_be_written_leaves_the_claim_prepared_without_it(node_factory: NodeFactory) -> None:
    node = node_factory()
    # A file where the metadata folder goes: every write fails (as on a broken or full disk).
    metadata_dir(node).write_text("")
    ref = node.claim([result("cpu-numa0", cpus=1)])
    response = node.prepare(ref)
    assert not response.error
    assert list(response.devices[0].cdi_device_ids) == [f"{DRIVER}/cpu=claim-{ref.uid}"]
    assert not metadata_spec(node, ref).exists()
    wait_until(lambda: node.driver.snapshot().ledger.claims.get(ref.uid) is not None, "the claim stays prepared")


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"", "no metadata objects found in stream"),
        (
            b'{"kind": "DeviceMetadata", "apiVersion": "metadata.resource.k8s.io/v9"}\n',
            "no compatible metadata version found in stream (unknown versions: metadata.resource.k8s.io/v9)",
        ),
        (b'{"kind": "DeviceMetadata"}', "an object without apiVersion"),
        (b'{"kind": "DeviceMetadata", "apiVersion": "metadata.resource.k8s.io/v1beta1"', "device metadata stream"),
        (
            b'{"kind": "DeviceMetadata", "apiVersion": "metadata.resource.k8s.io/v1beta1", "requests": [{"name":'
            b' "r", "devices": [{"driver": "d.x", "pool": "p", "name": "n", "attributes": {"a": {"int": 1,'
            b' "bool": true}}}]}]}',
            "exactly one of int, bool, string",
        ),
    ],
)
def test_the_readers_rules(stream: bytes, error: str) -> None:
    with pytest.raises(MetadataError) as failure:
        decode(stream)
    assert error in str(failure.value)


def test_a_newer_version_first_is_skipped(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa0", cpus=1)])
    assert not node.prepare(ref).error
    data = host_file(node, ref).read_bytes()
    newer = json.dumps({"kind": "DeviceMetadata", "apiVersion": "metadata.resource.k8s.io/v1", "x": 1}).encode()
    assert decode(newer + b"\n" + data) == decode(data)


@pytest.mark.skipif(not UPSTREAM_FIXTURE.exists(), reason="the Kubernetes 1.37.2 Go module cache is not installed")
def test_the_upstream_writers_file_reads_the_same_way_and_our_keys_keep_its_order(node_factory: NodeFactory) -> None:
    """The 1.37.2 helper's compatibility fixture (every field set, read from the module cache, not copied): our
    reader takes its first object, and the keys we write come in the order that writer puts them."""
    upstream_data = UPSTREAM_FIXTURE.read_bytes()
    upstream = decode(upstream_data, validate=False)
    assert upstream["apiVersion"] == "metadata.resource.k8s.io/v1beta1"
    assert [o["apiVersion"].rsplit("/", 1)[1] for o in objects(upstream_data)] == ["v1beta1", "v1alpha1"]
    node = node_factory()
    ref = node.claim([result("cpu-numa0", cpus=1)], annotations={"resource.kubernetes.io/pod-claim-name": "p"})
    assert not node.prepare(ref).error
    ours = decode(host_file(node, ref).read_bytes())

    def in_order(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
        return list(mine) == [k for k in theirs if k in mine]

    assert in_order(ours, upstream) and in_order(ours["metadata"], upstream["metadata"])
    assert in_order(ours["requests"][0], upstream["requests"][0])
    assert in_order(ours["requests"][0]["devices"][0], upstream["requests"][0]["devices"][0])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_the_metadata_file_is_indented_as_the_json_module_indents(value: Any) -> None:
    assert pretty_json(value) == json.dumps(value, indent=2)
