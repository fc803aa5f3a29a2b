"""The proto sources, the Python generated from them, and the wire identity the kubelet and runtimes rely on.

Field numbers and names below are the ones the kubelet, containerd's NRI and ttrpc use on the wire; a renumbered
field would compile and round-trip between our own stubs while being garbage to the real peer, so they are pinned
here independently of the .proto files.
"""

from __future__ import annotations

import importlib
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

from dra_cpu.kubelet.gen import (
    dra_health_v1_pb2,
    dra_health_v1alpha1_pb2,
    dra_health_v1alpha1_pb2_grpc,
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    pluginregistration_v1_pb2,
    pluginregistration_v1_pb2_grpc,
)
from dra_cpu.nri.gen import nri_ttrpc_pb2, nri_v1alpha1_pb2
from tests.harness.paths import REPO
from tests.harness.runtimes.containerd import CACHE
from tests.harness.runtimes.gen import cri_runtime_v1_pb2

GENERATED_DIRS = ["dra_cpu/kubelet/gen", "dra_cpu/nri/gen", "tests/harness/runtimes/gen"]
GENERATED_MODULES = [
    f"{d.replace('/', '.')}.{p.stem}" for d in GENERATED_DIRS for p in sorted((REPO / d).glob("*_pb2*.py"))
]


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for d in GENERATED_DIRS
        for p in sorted((root / d).iterdir())
        if p.is_file()
    }


def test_committed_code_is_what_update_protos_generates(tmp_path: Path) -> None:
    subprocess.run([REPO / "hack/update-protos.sh", tmp_path], check=True, capture_output=True, timeout=120)
    fresh = generated_files(tmp_path)
    committed = generated_files(REPO)
    assert sorted(committed) == sorted(fresh), "run hack/update-protos.sh"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"out of date, run hack/update-protos.sh: {stale}"


def test_every_generated_module_loads_into_one_descriptor_pool() -> None:
    assert len(GENERATED_MODULES) == 14
    modules = [importlib.import_module(name) for name in GENERATED_MODULES]
    file_names = [m.DESCRIPTOR.name for m in modules if m.__name__.endswith("_pb2")]
    assert len(file_names) == len(set(file_names)) == 8
    assert "api.proto" not in file_names


def field_numbers(message: type[Message]) -> dict[str, int]:
    return {field.name: field.number for field in message.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (pluginregistration_v1_pb2.PluginInfo, {"type": 1, "name": 2, "endpoint": 3, "supported_versions": 4}),
        (pluginregistration_v1_pb2.RegistrationStatus, {"plugin_registered": 1, "error": 2}),
        (pluginregistration_v1_pb2.InfoRequest, {}),
        (dra_v1_pb2.NodePrepareResourcesRequest, {"claims": 1}),
        (dra_v1_pb2.NodePrepareResourcesResponse, {"claims": 1}),
        (dra_v1_pb2.NodePrepareResourceResponse, {"devices": 1, "error": 2}),
        (dra_v1_pb2.NodeUnprepareResourcesRequest, {"claims": 1}),
        (dra_v1_pb2.NodeUnprepareResourcesResponse, {"claims": 1}),
        (dra_v1_pb2.NodeUnprepareResourceResponse, {"error": 1}),
        (dra_v1_pb2.Claim, {"namespace": 1, "uid": 2, "name": 3}),
        (
            dra_v1_pb2.Device,
            {"request_names": 1, "pool_name": 2, "device_name": 3, "cdi_device_ids": 4, "share_id": 5},
        ),
        (dra_v1beta1_pb2.Claim, {"namespace": 1, "uid": 2, "name": 3}),
        (dra_v1beta1_pb2.Device, {"request_names": 1, "pool_name": 2, "device_name": 3, "cdi_device_ids": 4}),
        (dra_health_v1_pb2.NodeWatchResourcesResponse, {"devices": 1}),
        (
            dra_health_v1_pb2.DeviceHealth,
            {"device": 1, "health": 2, "last_updated_time": 3, "health_check_timeout_seconds": 4, "message": 5},
        ),
        (dra_health_v1_pb2.DeviceIdentifier, {"pool_name": 1, "device_name": 2}),
        (dra_health_v1alpha1_pb2.NodeWatchResourcesResponse, {"devices": 1}),
        (
            dra_health_v1alpha1_pb2.DeviceHealth,
            {"device": 1, "health": 2, "last_updated_time": 3, "health_check_timeout_seconds": 4, "message": 5},
        ),
        (dra_health_v1alpha1_pb2.DeviceIdentifier, {"pool_name": 1, "device_name": 2}),
        (nri_v1alpha1_pb2.RegisterPluginRequest, {"plugin_name": 1, "plugin_idx": 2, "NRI_version": 3}),
        (nri_v1alpha1_pb2.ConfigureResponse, {"events": 2}),
        (nri_v1alpha1_pb2.SynchronizeRequest, {"pods": 1, "containers": 2, "more": 3}),
        (nri_v1alpha1_pb2.SynchronizeResponse, {"update": 1, "more": 2}),
        (nri_v1alpha1_pb2.CreateContainerRequest, {"pod": 1, "container": 2}),
        (nri_v1alpha1_pb2.CreateContainerResponse, {"adjust": 1, "update": 2, "evict": 3}),
        (nri_v1alpha1_pb2.StartContainerRequest, {"pod": 1, "container": 2}),
        (nri_v1alpha1_pb2.StartContainerResponse, {}),
        (nri_v1alpha1_pb2.RemoveContainerRequest, {"pod": 1, "container": 2}),
        (nri_v1alpha1_pb2.RemoveContainerResponse, {}),
        (nri_v1alpha1_pb2.StateChangeEvent, {"event": 1, "pod": 2, "container": 3}),
        (nri_v1alpha1_pb2.ContainerUpdate, {"container_id": 1, "linux": 2, "ignore_failure": 3}),
        (nri_v1alpha1_pb2.LinuxContainerUpdate, {"resources": 1}),
        (nri_ttrpc_pb2.Request, {"service": 1, "method": 2, "payload": 3, "timeout_nano": 4, "metadata": 5}),
        (nri_ttrpc_pb2.Response, {"status": 1, "payload": 2}),
        (nri_ttrpc_pb2.KeyValue, {"key": 1, "value": 2}),
        (cri_runtime_v1_pb2.CDIDevice, {"name": 1}),
    ],
    ids=lambda v: v.DESCRIPTOR.full_name if isinstance(v, type) and issubclass(v, Message) else "",
)
def test_field_numbers_match_the_wire(message: type[Message], expected: dict[str, int]) -> None:
    assert field_numbers(message) == expected


def test_nri_paths_to_cpuset_env_and_events() -> None:
    def number(message: type[Message], field: str) -> int:
        return field_numbers(message)[field]

    assert number(nri_v1alpha1_pb2.Container, "env") == 8
    assert number(nri_v1alpha1_pb2.ContainerAdjustment, "linux") == 6
    assert number(nri_v1alpha1_pb2.LinuxContainerAdjustment, "resources") == 2
    assert number(nri_v1alpha1_pb2.LinuxResources, "cpu") == 2
    assert number(nri_v1alpha1_pb2.LinuxCPU, "cpus") == 6
    assert number(nri_v1alpha1_pb2.LinuxCPU, "mems") == 7
    assert number(cri_runtime_v1_pb2.ContainerConfig, "CDI_devices") == 17
    assert (nri_v1alpha1_pb2.CREATE_CONTAINER, nri_v1alpha1_pb2.STOP_CONTAINER) == (4, 10)
    assert (nri_v1alpha1_pb2.START_CONTAINER, nri_v1alpha1_pb2.REMOVE_CONTAINER) == (6, 11)
    adjust = nri_v1alpha1_pb2.ContainerAdjustment()
    adjust.linux.resources.cpu.cpus = "2-3"
    # The bytes containerd decodes: adjust{6: linux{2: resources{2: cpu{6: "2-3"}}}}.
    assert adjust.SerializeToString().hex() == "3209120712053203322d33"


def test_service_and_method_paths_are_the_kubelets_and_runtimes() -> None:
    def methods(module: ModuleType, service: str) -> list[str]:
        desc = module.DESCRIPTOR.services_by_name[service]
        return [f"/{desc.full_name}/{m.name}" for m in desc.methods]

    assert methods(pluginregistration_v1_pb2, "Registration") == [
        "/pluginregistration.Registration/GetInfo",
        "/pluginregistration.Registration/NotifyRegistrationStatus",
    ]
    for module, version in [(dra_v1_pb2, "v1"), (dra_v1beta1_pb2, "v1beta1")]:
        assert methods(module, "DRAPlugin") == [
            f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodePrepareResources",
            f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodeUnprepareResources",
        ]
    assert methods(dra_health_v1alpha1_pb2, "DRAResourceHealth") == ["/v1alpha1.DRAResourceHealth/NodeWatchResources"]
    assert methods(dra_health_v1_pb2, "DRAResourceHealth") == ["/v1.DRAResourceHealth/NodeWatchResources"]
    for module in (dra_health_v1_pb2, dra_health_v1alpha1_pb2):
        assert (module.UNKNOWN, module.HEALTHY, module.UNHEALTHY) == (0, 1, 2)
    assert methods(nri_v1alpha1_pb2, "Runtime") == [
        "/nri.pkg.api.v1alpha1.Runtime/RegisterPlugin",
        "/nri.pkg.api.v1alpha1.Runtime/UpdateContainers",
    ]
    plugin = methods(nri_v1alpha1_pb2, "Plugin")
    for method in ("CreateContainer", "StartContainer", "RemoveContainer", "StateChange"):
        assert f"/nri.pkg.api.v1alpha1.Plugin/{method}" in plugin


NRI_UPSTREAM = CACHE / "go/mod/github.com/containerd/nri@v0.12.3/pkg/api/api.proto"


def _descriptor(proto: Path) -> descriptor_pb2.FileDescriptorProto:
    """`proto` compiled on its own, without its name, comments and source positions."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "api.proto", Path(tmp) / "api.pb"
        source.write_text(proto.read_text())
        assert protoc.main(["protoc", f"-I{tmp}", f"--descriptor_set_out={out}", str(source)]) == 0
        (descriptor,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    descriptor.ClearField("source_code_info")
    return descriptor


def test_nri_proto_is_nri_0_12_3_on_the_wire() -> None:
    """Ours is Debian's 0.8.0 file with everything 0.12.3 added written in by hand: compared with the real one
    (fetched into the Go module cache by hack/testenv/containerd.sh) it must differ in comments only."""
    if not NRI_UPSTREAM.is_file():
        pytest.skip(f"{NRI_UPSTREAM} is not there: run hack/testenv/containerd.sh install")
    ours, upstream = _descriptor(REPO / "protos/nri/nri_v1alpha1.proto"), _descriptor(NRI_UPSTREAM)
    assert [m.name for m in ours.message_type] == [m.name for m in upstream.message_type]
    assert [e.name for e in ours.enum_type] == [e.name for e in upstream.enum_type]
    assert ours == upstream


def test_device_wire_bytes_and_share_id_presence() -> None:
    device = dra_v1_pb2.Device(
        request_names=["r"], pool_name="p", device_name="d", cdi_device_ids=["v.com/c=n"], share_id="s"
    )
    fields_1_to_5 = ["0a0172", "120170", "1a0164", "2209762e636f6d2f633d6e", "2a0173"]
    assert device.SerializeToString().hex() == "".join(fields_1_to_5)
    unset = dra_v1_pb2.Device(pool_name="p")
    assert not unset.HasField("share_id")
    # share_id is v1 only; a v1beta1 kubelet must not see it (it would keep it as an unknown field).
    assert dra_v1beta1_pb2.Device.FromString(device.SerializeToString()).device_name == "d"
    assert "share_id" not in dra_v1beta1_pb2.Device.DESCRIPTOR.fields_by_name


def test_ttrpc_response_carries_a_google_rpc_status() -> None:
    response = nri_ttrpc_pb2.Response(status=status_pb2.Status(code=5, message="no such container"), payload=b"x")
    wire = response.SerializeToString()
    assert wire.hex() == "0a1508051211" + b"no such container".hex() + "120178"
    assert nri_ttrpc_pb2.Response.FromString(wire).status.message == "no such container"


DRIVER = "cpu.example.com"


class Registration(pluginregistration_v1_pb2_grpc.RegistrationServicer):
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.statuses: list[pluginregistration_v1_pb2.RegistrationStatus] = []

    def GetInfo(
        self, request: pluginregistration_v1_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> pluginregistration_v1_pb2.PluginInfo:
        return pluginregistration_v1_pb2.PluginInfo(
            type="DRAPlugin",
            name=DRIVER,
            endpoint=self.endpoint,
            supported_versions=["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth"],
        )

    def NotifyRegistrationStatus(
        self, request: pluginregistration_v1_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> pluginregistration_v1_pb2.RegistrationStatusResponse:
        self.statuses.append(request)
        return pluginregistration_v1_pb2.RegistrationStatusResponse()


class DRAPlugin(dra_v1_pb2_grpc.DRAPluginServicer):
    def NodePrepareResources(
        self, request: dra_v1_pb2.NodePrepareResourcesRequest, context: grpc.ServicerContext
    ) -> dra_v1_pb2.NodePrepareResourcesResponse:
        response = dra_v1_pb2.NodePrepareResourcesResponse()
        for claim in request.claims:
            response.claims[claim.uid].devices.append(
                dra_v1_pb2.Device(
                    request_names=["cpus"],
                    pool_name="node-a",
                    device_name="cpu-2",
                    cdi_device_ids=[f"{DRIVER}/cpuset=claim-{claim.uid}"],
                    share_id=f"share-{claim.name}",
                )
            )
        return response

    def NodeUnprepareResources(
        self, request: dra_v1_pb2.NodeUnprepareResourcesRequest, context: grpc.ServicerContext
    ) -> dra_v1_pb2.NodeUnprepareResourcesResponse:
        response = dra_v1_pb2.NodeUnprepareResourcesResponse()
        for claim in request.claims:
            response.claims[claim.uid].SetInParent()
        return response


class Health(dra_health_v1alpha1_pb2_grpc.DRAResourceHealthServicer):
    def NodeWatchResources(
        self, request: dra_health_v1alpha1_pb2.NodeWatchResourcesRequest, context: grpc.ServicerContext
    ) -> Iterator[dra_health_v1alpha1_pb2.NodeWatchResourcesResponse]:
        for health in (dra_health_v1alpha1_pb2.HEALTHY, dra_health_v1alpha1_pb2.UNHEALTHY):
            device = dra_health_v1alpha1_pb2.DeviceHealth(health=health, last_updated_time=1)
            device.device.pool_name, device.device.device_name = "node-a", "cpu-2"
            yield dra_health_v1alpha1_pb2.NodeWatchResourcesResponse(devices=[device])


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[tuple[Path, Path, Registration]]:
    """A registration socket and a DRA socket served by one real gRPC server, as a driver would run them."""
    reg_sock, dra_sock = tmp_path / "reg.sock", tmp_path / "dra.sock"
    registration = Registration(str(dra_sock))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pluginregistration_v1_pb2_grpc.add_RegistrationServicer_to_server(registration, server)
    dra_v1_pb2_grpc.add_DRAPluginServicer_to_server(DRAPlugin(), server)
    dra_health_v1alpha1_pb2_grpc.add_DRAResourceHealthServicer_to_server(Health(), server)
    for sock in (reg_sock, dra_sock):
        assert server.add_insecure_port(f"unix://{sock}") != 0
    server.start()
    try:
        yield reg_sock, dra_sock, registration
    finally:
        server.stop(grace=None).wait()


def test_registration_and_prepare_over_unix_sockets(sockets: tuple[Path, Path, Registration]) -> None:
    reg_sock, dra_sock, registration = sockets
    assert reg_sock.is_socket() and dra_sock.is_socket()
    with grpc.insecure_channel(f"unix:{reg_sock}") as channel:
        stub = pluginregistration_v1_pb2_grpc.RegistrationStub(channel)
        info = stub.GetInfo(pluginregistration_v1_pb2.InfoRequest(), timeout=1)
        stub.NotifyRegistrationStatus(pluginregistration_v1_pb2.RegistrationStatus(plugin_registered=True), timeout=5)
    assert (info.type, info.name, info.endpoint) == ("DRAPlugin", DRIVER, str(dra_sock))
    assert list(info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth"]
    assert [s.plugin_registered for s in registration.statuses] == [True]

    # Called the way the kubelet does: by method path, on the endpoint GetInfo named, with raw bytes.
    request = dra_v1_pb2.NodePrepareResourcesRequest(
        claims=[dra_v1_pb2.Claim(namespace="ns", uid="uid-1", name="c1"), dra_v1_pb2.Claim(uid="uid-2", name="c2")]
    )
    with grpc.insecure_channel(f"unix:{info.endpoint}") as channel:
        prepare = channel.unary_unary("/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources")
        raw = prepare(request.SerializeToString(), timeout=45)
        watch = dra_health_v1alpha1_pb2_grpc.DRAResourceHealthStub(channel).NodeWatchResources(
            dra_health_v1alpha1_pb2.NodeWatchResourcesRequest(), timeout=5
        )
        health = [r.devices[0].health for r in watch]
    response = dra_v1_pb2.NodePrepareResourcesResponse.FromString(raw)
    assert sorted(response.claims) == ["uid-1", "uid-2"]
    device = response.claims["uid-1"].devices[0]
    assert (device.pool_name, device.device_name, device.share_id) == ("node-a", "cpu-2", "share-c1")
    assert list(device.cdi_device_ids) == [f"{DRIVER}/cpuset=claim-uid-1"]
    assert health == [dra_health_v1alpha1_pb2.HEALTHY, dra_health_v1alpha1_pb2.UNHEALTHY]


def test_unprepare_and_a_service_not_served(sockets: tuple[Path, Path, Registration]) -> None:
    _, dra_sock, _ = sockets
    claim = dra_v1_pb2.Claim(namespace="ns", uid="uid-1", name="c1")
    with grpc.insecure_channel(f"unix:{dra_sock}") as channel:
        unprepared = dra_v1_pb2_grpc.DRAPluginStub(channel).NodeUnprepareResources(
            dra_v1_pb2.NodeUnprepareResourcesRequest(claims=[claim]), timeout=45
        )
        # Only v1 is registered on this server: a kubelet trying v1beta1 gets UNIMPLEMENTED, not a hang.
        with pytest.raises(grpc.RpcError) as failure:
            dra_v1beta1_pb2_grpc.DRAPluginStub(channel).NodeUnprepareResources(
                dra_v1beta1_pb2.NodeUnprepareResourcesRequest(), timeout=5
            )
    assert list(unprepared.claims) == ["uid-1"] and unprepared.claims["uid-1"].error == ""
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_v1_and_v1alpha1_are_the_same_bytes() -> None:
    """Only the package differs: one DeviceHealth serialises identically in both, field by field."""
    encoded = set()
    for pb in (dra_health_v1_pb2, dra_health_v1alpha1_pb2):
        device = pb.DeviceHealth(
            device=pb.DeviceIdentifier(pool_name="p", device_name="d"),
            health=pb.UNHEALTHY,
            last_updated_time=1,
            health_check_timeout_seconds=20,
            message="m",
        )
        encoded.add(device.SerializeToString().hex())
    # device{1: pool "p", 2: name "d"}, health 2, last_updated_time 1, timeout 20, message "m".
    assert encoded == {"0a060a01701201641002180120142a016d"}
