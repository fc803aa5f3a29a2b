"""KubeAPI against the test API server: what it writes is read back with the typed client, errors name the object,
and connect() fails with one line on a wrong kubeconfig or an unreachable server."""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from dra_cpu.cli import main
from dra_cpu.errors import DraCpuError
from dra_cpu.kube.api import ClusterError, Conflict, NotFound
from dra_cpu.kube.apiserver import KubeAPI, KubeconfigError, connect
from tests.harness.cluster.control_plane import ApiServer
from tests.harness.cluster.objects import resource_slice
from tests.harness.typed import present


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def slice_obj(name: str, node: str, driver: str, devices: int = 1) -> dict[str, Any]:
    cpus = [{"name": f"cpu-{i}", "attributes": {"dra.cpu/cpuID": {"int": i}}} for i in range(devices)]
    return resource_slice(name, node, driver, cpus)


def test_slices_round_trip_through_the_server(kube: KubeAPI, kube_api: client.ApiClient) -> None:
    driver, node = f"{unique('cpu')}.example.com", unique("node")
    created = kube.create_slice(slice_obj(unique("mine"), node, driver, devices=2))
    kube.create_slice(slice_obj(unique("other-node"), unique("node"), driver))
    kube.create_slice(slice_obj(unique("other-driver"), node, f"{unique('gpu')}.example.com"))

    [listed] = kube.list_slices(driver, node)
    assert listed["metadata"]["name"] == created["metadata"]["name"]
    assert [d["name"] for d in listed["spec"]["devices"]] == ["cpu-0", "cpu-1"]

    listed["spec"]["devices"] = listed["spec"]["devices"][:1]
    updated = kube.update_slice(listed)
    assert updated["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    typed = client.ResourceV1Api(kube_api).read_resource_slice(created["metadata"]["name"])
    assert [d.name for d in present(typed.spec.devices)] == ["cpu-0"]

    kube.delete_slice(created["metadata"]["name"])
    kube.delete_slice(created["metadata"]["name"])  # already gone: still fine
    assert kube.list_slices(driver, node) == []


def test_errors_name_the_object(kube: KubeAPI, kube_namespace: str) -> None:
    name = unique("slice")
    stale = kube.create_slice(slice_obj(name, unique("node"), "cpu.example.com"))
    kube.update_slice({**stale, "spec": {**stale["spec"], "devices": []}})
    with pytest.raises(Conflict, match=f"resourceslice {name}: 409 .*already exists"):
        kube.create_slice(slice_obj(name, unique("node"), "cpu.example.com"))
    with pytest.raises(Conflict, match=f"resourceslice {name}: 409 .*modified"):
        kube.update_slice(stale)
    kube.delete_slice(name)
    with pytest.raises(NotFound, match=f"resourceslice {name}: 404"):
        kube.update_slice(stale)
    with pytest.raises(NotFound, match=f"resourceclaim {kube_namespace}/absent: 404"):
        kube.get_claim(kube_namespace, "absent")
    with pytest.raises(ClusterError, match=f"resourceslice {name}-x: 400 .*spec.devices"):
        broken = slice_obj(f"{name}-x", unique("node"), "cpu.example.com")
        broken["spec"]["devices"] = "not a list"
        kube.create_slice(broken)


def test_claims_read_as_stored(kube: KubeAPI, kube_api: client.ApiClient, kube_namespace: str) -> None:
    body = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "claim"},
        "spec": {"devices": {"requests": [{"name": "cpus", "exactly": {"deviceClassName": "dra.cpu"}}]}},
    }
    client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "resource.k8s.io", "v1", kube_namespace, "resourceclaims", body
    )
    claim = kube.get_claim(kube_namespace, "claim")
    assert claim["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] == "dra.cpu"
    assert claim["metadata"]["uid"]


def test_a_node_that_cannot_be_read_is_none(kube: KubeAPI) -> None:
    # The test server serves no core types, as a cluster where the driver may not read Nodes.
    assert kube.get_node(unique("node")) is None


def test_watch_yields_on_changes_by_others_and_stops_promptly(kube: KubeAPI) -> None:
    driver, node = f"{unique('cpu')}.example.com", unique("node")
    stop = threading.Event()
    events: queue.Queue[float] = queue.Queue()

    def consume() -> None:
        for _ in kube.watch_slices(driver, node, stop):
            events.put(time.monotonic())

    watcher = threading.Thread(target=consume, daemon=True)
    watcher.start()
    events.get(timeout=10)  # the first list
    kube.create_slice(slice_obj(unique("slice"), unique("node"), driver))  # another node: no event
    name = unique("slice")
    written = time.monotonic()
    kube.create_slice(slice_obj(name, node, driver))
    assert events.get(timeout=5) >= written
    kube.delete_slice(name)
    events.get(timeout=5)
    assert events.empty()

    stop.set()
    watcher.join(timeout=2)
    assert not watcher.is_alive()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def kubeconfig_copy(apiserver: ApiServer, path: Path, server: str) -> Path:
    config = yaml.safe_load(apiserver.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = server
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "kubeconfig {path}: no such file"),
        ("clusters: [", "kubeconfig {path} is not valid YAML: "),
        ("just a string", "kubeconfig {path} does not hold a kubeconfig"),
        ("apiVersion: v1\nkind: Config\n", "kubeconfig {path}: Invalid kube-config file. Expected key current-context"),
    ],
)
def test_connect_rejects_a_bad_kubeconfig_in_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "kubeconfig"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KubeconfigError) as err:
        connect(str(path))
    assert str(err.value).startswith(message.format(path=path))
    assert "\n" not in str(err.value)


def test_a_kubeconfig_that_is_not_utf8_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "kubeconfig"
    path.write_bytes(b"apiVersion: v1\nkind: Config\ncurrent-context: \xc3\x28\n")
    with pytest.raises(KubeconfigError, match=rf"^kubeconfig {path} is not UTF-8 text: byte b'\\xc3' at offset 45$"):
        connect(str(path))
    assert main(["status", "--kubeconfig", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_connect_without_kubeconfig_outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeconfigError, match=r"^no --kubeconfig given and no in-cluster service account: "):
        connect(None)


def test_connect_fails_in_one_line_when_the_server_is_unreachable(apiserver: ApiServer, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{closed_port()}"
    with pytest.raises(ClusterError) as err:
        connect(str(kubeconfig_copy(apiserver, tmp_path / "kubeconfig", url)))
    assert isinstance(err.value, DraCpuError)
    assert str(err.value).startswith(f"cannot reach the API server at {url}: ")
    assert "Connection refused" in str(err.value)
    assert "\n" not in str(err.value) and "object at 0x" not in str(err.value)


def test_connect_fails_when_the_server_is_not_trusted(apiserver: ApiServer, tmp_path: Path) -> None:
    config = yaml.safe_load(apiserver.kubeconfig.read_text())
    # The client certificate's CA is not the one that signed the server's certificate.
    config["clusters"][0]["cluster"]["certificate-authority"] = config["users"][0]["user"]["client-certificate"]
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ClusterError, match=f"^cannot reach the API server at {apiserver.url}: .*CERTIFICATE_VERIFY"):
        connect(str(path))
