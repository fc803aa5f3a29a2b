"""What the kubelet asks of containerd (CRI) and of the driver (plugin registration, NodePrepareResources), made
inside the test guest: the agent (agent.py beside it) imports this module for its "call" op.

Every function takes and returns JSON values. The gRPC stubs are compiled at first use from the checkout's protos/
(grpc_tools from the host's .venv), so that this module depends on neither the driver's package layout nor on
generated code elsewhere in the tests; the driver itself is only ever run through its command line.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[4]
BUSYBOX_IMAGE = "localhost/busybox:latest"
"""The image hack/testenv/containerd.sh imports; its default command sleeps until SIGTERM."""
TIMEOUT = 60.0

_stubs: SimpleNamespace | None = None


def stubs() -> SimpleNamespace:
    """cri (runtime.v1), registration (pluginregistration) and dra (DRA v1) messages and stubs."""
    global _stubs
    if _stubs is None:
        from grpc_tools import protoc  # type: ignore[import-untyped]

        out = tempfile.mkdtemp(prefix="guest-protos-")
        for directory, name in (("cri", "cri_runtime_v1"), ("kubelet", "pluginregistration_v1"), ("kubelet", "dra_v1")):
            source = ROOT / "protos" / directory
            args = [f"-I{source}", f"--python_out={out}", f"--grpc_python_out={out}", f"{source}/{name}.proto"]
            if protoc.main(["protoc", *args]) != 0:
                raise RuntimeError(f"protoc failed for {source}/{name}.proto")
        sys.path.insert(0, out)
        modules = {
            f"{short}{kind}": importlib.import_module(f"{name}{suffix}")
            for short, name in (("cri", "cri_runtime_v1"), ("reg", "pluginregistration_v1"), ("dra", "dra_v1"))
            for kind, suffix in (("", "_pb2"), ("_grpc", "_pb2_grpc"))
        }
        _stubs = SimpleNamespace(**modules)
    return _stubs


@dataclass
class _Cri:
    channel: grpc.Channel
    runtime: Any
    pods: dict[str, Any] = field(default_factory=dict)
    """Pod id -> its PodSandboxConfig, which CreateContainer needs again."""


_CRI: dict[str, _Cri] = {}


def _cri(socket: str) -> _Cri:
    if socket not in _CRI:
        channel = grpc.insecure_channel(f"unix://{socket}")
        _CRI[socket] = _Cri(channel, stubs().cri_grpc.RuntimeServiceStub(channel))
    return _CRI[socket]


def cri_version(socket: str) -> str:
    pb = stubs().cri
    response = _cri(socket).runtime.Version(pb.VersionRequest(), timeout=TIMEOUT, wait_for_ready=True)
    return f"{response.runtime_name} {response.runtime_version}"


def run_pod(socket: str, name: str, cgroup_parent: str, uid: str = "", namespace: str = "default") -> dict[str, str]:
    """RunPodSandbox with the host network, its cgroup at <cgroup_parent>/pod<uid> as kubelet's cgroupfs driver."""
    pb = stubs().cri
    uid = uid or str(uuid.uuid4())
    pod_cgroup = f"{cgroup_parent}/pod{uid}"
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=pod_cgroup,
            security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(network=pb.NODE)),
        ),
    )
    cri = _cri(socket)
    pod_id = cri.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=TIMEOUT).pod_sandbox_id
    cri.pods[pod_id] = config
    # The fields of tests/harness/runtimes/cri.py's Pod, which the host makes of it.
    return {"id": pod_id, "name": name, "namespace": namespace, "uid": uid, "cgroup_parent": pod_cgroup}


def create_container(
    socket: str,
    pod_id: str,
    name: str,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    cdi_devices: list[str] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    start: bool = True,
) -> str:
    """CreateContainer (CDI devices passed as kubelet >= 1.28 does) and StartContainer unless `start` is false."""
    pb = stubs().cri
    cri = _cri(socket)
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=BUSYBOX_IMAGE),
        command=command or [],
        envs=[pb.KeyValue(key=k, value=v.encode()) for k, v in (env or {}).items()],
        CDI_devices=[pb.CDIDevice(name=d) for d in cdi_devices or []],
        mounts=[pb.Mount(**m) for m in mounts or []],
    )
    request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=cri.pods[pod_id])
    container_id: str = cri.runtime.CreateContainer(request, timeout=TIMEOUT).container_id
    if start:
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id), timeout=TIMEOUT)
    return container_id


def exec_sync(socket: str, container_id: str, cmd: list[str], timeout: int = 60) -> dict[str, Any]:
    pb = stubs().cri
    request = pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
    response = _cri(socket).runtime.ExecSync(request, timeout=timeout + 10)
    return {"rc": response.exit_code, "stdout": response.stdout.decode(), "stderr": response.stderr.decode()}


def container_pid(socket: str, container_id: str) -> int:
    """The pid of the container's first process, from the runtime's verbose status."""
    pb = stubs().cri
    request = pb.ContainerStatusRequest(container_id=container_id, verbose=True)
    info = json.loads(_cri(socket).runtime.ContainerStatus(request, timeout=TIMEOUT).info["info"])
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise RuntimeError(f"container {container_id} has no running process (pid {pid!r})")
    return pid


def update_resources(socket: str, container_id: str, cpuset_cpus: str = "", cpuset_mems: str = "") -> None:
    """UpdateContainerResources, as kubelet's CPU manager does; empty means unchanged."""
    pb = stubs().cri
    resources = pb.LinuxContainerResources(cpuset_cpus=cpuset_cpus, cpuset_mems=cpuset_mems)
    request = pb.UpdateContainerResourcesRequest(container_id=container_id, linux=resources)
    _cri(socket).runtime.UpdateContainerResources(request, timeout=TIMEOUT)


def remove_pod(socket: str, pod_id: str) -> None:
    pb = stubs().cri
    cri = _cri(socket)
    cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT)
    cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT)
    cri.pods.pop(pod_id, None)


def remove_pods(socket: str) -> int:
    """Remove every pod started through `socket`; returns how many."""
    cri = _cri(socket)
    pods = list(cri.pods)
    for pod_id in pods:
        remove_pod(socket, pod_id)
    return len(pods)


def close(socket: str) -> None:
    cri = _CRI.pop(socket, None)
    if cri is not None:
        cri.channel.close()


# The kubelet side of the driver: plugin registration, then DRA v1 calls on the endpoint it names.
_DRA: dict[str, tuple[grpc.Channel, Any]] = {}


def register(registration: str) -> dict[str, Any]:
    """GetInfo and NotifyRegistrationStatus on the driver's registration socket, as the kubelet's plugin watcher."""
    s = stubs()
    with grpc.insecure_channel(f"unix://{registration}") as channel:
        stub = s.reg_grpc.RegistrationStub(channel)
        info = stub.GetInfo(s.reg.InfoRequest(), timeout=TIMEOUT, wait_for_ready=True)
        stub.NotifyRegistrationStatus(s.reg.RegistrationStatus(plugin_registered=True), timeout=TIMEOUT)
    old = _DRA.pop(registration, None)
    if old is not None:
        old[0].close()
    channel = grpc.insecure_channel(f"unix://{info.endpoint}")
    _DRA[registration] = (channel, s.dra_grpc.DRAPluginStub(channel))
    return {"type": info.type, "name": info.name, "endpoint": info.endpoint, "versions": list(info.supported_versions)}


def _claims(claims: list[dict[str, str]]) -> list[Any]:
    return [stubs().dra.Claim(namespace=c["namespace"], name=c["name"], uid=c["uid"]) for c in claims]


def prepare(registration: str, claims: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """NodePrepareResources: per claim uid, its error and its devices (pool, device, requests, CDI ids)."""
    request = stubs().dra.NodePrepareResourcesRequest(claims=_claims(claims))
    response = _DRA[registration][1].NodePrepareResources(request, timeout=TIMEOUT)
    return {
        uid: {
            "error": result.error,
            "devices": [
                {
                    "requests": list(d.request_names),
                    "pool": d.pool_name,
                    "device": d.device_name,
                    "cdi": list(d.cdi_device_ids),
                }
                for d in result.devices
            ],
        }
        for uid, result in response.claims.items()
    }


def unprepare(registration: str, claims: list[dict[str, str]]) -> dict[str, str]:
    request = stubs().dra.NodeUnprepareResourcesRequest(claims=_claims(claims))
    response = _DRA[registration][1].NodeUnprepareResources(request, timeout=TIMEOUT)
    return {uid: result.error for uid, result in response.claims.items()}


def unregister(registration: str) -> None:
    old = _DRA.pop(registration, None)
    if old is not None:
        old[0].close()


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        text: str = response.read().decode()
    return text
