"""A small CRI client for tests: what kubelet asks of a container runtime, reduced to what dra-cpu's tests need.

It speaks runtime.v1 over gRPC to a real runtime (containerd) with the stubs in gen/ beside it, and remembers the pods
it started so that one `cleanup()` removes them all. Pods run with the host network (no CNI) under a cgroup parent
the caller picks: containerd cannot move it, so each run must use its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dra_cpu.core.cpuset import CPUSet
from tests.harness.runtimes.gen import cri_runtime_v1_pb2 as pb
from tests.harness.runtimes.gen import cri_runtime_v1_pb2_grpc as pb_grpc

BUSYBOX_IMAGE = "localhost/busybox:latest"
"""The image that hack/testenv/containerd.sh imports; its default command sleeps until SIGTERM."""


class CriError(RuntimeError):
    """A CRI call that failed, or a command in a container that did not exit 0."""


@dataclass(frozen=True)
class Pod:
    """A pod sandbox, as RunPodSandbox made it."""

    id: str
    name: str
    namespace: str
    uid: str
    cgroup_parent: str
    config: pb.PodSandboxConfig | None = field(default=None, repr=False)
    """What CreateContainer sends again as the sandbox config; None where another client keeps it (the guest's
    tests/harness/guest/inside/kubelet_calls.py)."""


@dataclass(frozen=True)
class Container:
    """A container of `pod`, as CreateContainer made it."""

    id: str
    name: str
    pod: Pod


@dataclass(frozen=True)
class ExecResult:
    """What ExecSync answered."""

    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Allowed:
    """What the kernel lets a task use: `Cpus_allowed_list` and `Mems_allowed_list` of /proc/<pid>/status."""

    cpus: CPUSet
    mems: CPUSet

    @classmethod
    def parse(cls, proc_status: str) -> Allowed:
        fields = dict(line.split(":", 1) for line in proc_status.splitlines() if ":" in line)
        return cls(CPUSet.parse(fields["Cpus_allowed_list"]), CPUSet.parse(fields["Mems_allowed_list"]))

    @classmethod
    def of_pid(cls, pid: int) -> Allowed:
        return cls.parse(Path(f"/proc/{pid}/status").read_text())


class CriClient:
    def __init__(self, socket: Path, cgroup_parent: str, timeout: float = 30.0) -> None:
        """`cgroup_parent` (e.g. /kubepods-abc) holds every pod's cgroup, as /kubepods does under kubelet."""
        self.cgroup_parent = cgroup_parent
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = pb_grpc.RuntimeServiceStub(self._channel)
        self.images = pb_grpc.ImageServiceStub(self._channel)
        self._pods: dict[str, Pod] = {}

    def version(self) -> pb.VersionResponse:
        # grpc is untyped: name the response type so that callers get it.
        response: pb.VersionResponse = self.runtime.Version(
            pb.VersionRequest(), timeout=self.timeout, wait_for_ready=True
        )
        return response

    def run_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        uid: str | None = None,
        annotations: Mapping[str, str] | None = None,
        cpuset_cpus: str = "",
    ) -> Pod:
        """RunPodSandbox with the host network, its cgroup at <cgroup parent>/pod<uid> as kubelet's cgroupfs driver."""
        uid = uid or str(uuid.uuid4())
        cgroup_parent = f"{self.cgroup_parent}/pod{uid}"
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.NODE),
                ),
                resources=pb.LinuxContainerResources(cpuset_cpus=cpuset_cpus) if cpuset_cpus else None,
            ),
        )
        response = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=self.timeout)
        pod = Pod(response.pod_sandbox_id, name, namespace, uid, cgroup_parent, config)
        self._pods[pod.id] = pod
        return pod

    def create_container(
        self,
        pod: Pod,
        name: str,
        *,
        image: str = BUSYBOX_IMAGE,
        command: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cdi_devices: Sequence[str] = (),
        annotations: Mapping[str, str] | None = None,
        cpuset_cpus: str = "",
        cpuset_mems: str = "",
        start: bool = True,
    ) -> Container:
        """CreateContainer (and StartContainer unless `start` is false).

        `cdi_devices` are fully qualified CDI names (vendor/class=name) passed the way kubelet >= 1.28 does, in
        ContainerConfig.CDI_devices; the older way is an annotation `cdi.k8s.io/<key>: vendor/class=name`.
        """
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=image),
            command=list(command),
            envs=[pb.KeyValue(key=k, value=v.encode()) for k, v in (env or {}).items()],
            annotations=dict(annotations or {}),
            CDI_devices=[pb.CDIDevice(name=device) for device in cdi_devices],
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(cpuset_cpus=cpuset_cpus, cpuset_mems=cpuset_mems),
            ),
        )
        request = pb.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config)
        container = Container(self.runtime.CreateContainer(request, timeout=self.timeout).container_id, name, pod)
        if start:
            self.start(container)
        return container

    def start(self, container: Container) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=container.id), timeout=self.timeout)

    def update_resources(self, container: Container, *, cpuset_cpus: str = "", cpuset_mems: str = "") -> None:
        """UpdateContainerResources, as kubelet's CPU manager does; empty means unchanged."""
        resources = pb.LinuxContainerResources(cpuset_cpus=cpuset_cpus, cpuset_mems=cpuset_mems)
        request = pb.UpdateContainerResourcesRequest(container_id=container.id, linux=resources)
        self.runtime.UpdateContainerResources(request, timeout=self.timeout)

    def exec_sync(self, container: Container | str, cmd: Sequence[str], *, check: bool = True) -> ExecResult:
        """Run `cmd` in the container (or the one of that id, which another client made: a kubelet) and wait for it;
        `check` makes a non-zero exit a CriError."""
        cid, name = _id_and_name(container)
        request = pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=int(self.timeout))
        response = self.runtime.ExecSync(request, timeout=self.timeout + 5)
        result = ExecResult(response.exit_code, response.stdout.decode(), response.stderr.decode())
        if check and result.exit_code != 0:
            raise CriError(f"{list(cmd)} in {name} exited {result.exit_code}: {result.stderr.strip()}")
        return result

    def status(self, container: Container) -> pb.ContainerStatus:
        request = pb.ContainerStatusRequest(container_id=container.id)
        response: pb.ContainerStatusResponse = self.runtime.ContainerStatus(request, timeout=self.timeout)
        return response.status

    def info(self, container: Container | str) -> dict[str, Any]:
        """The runtime's verbose container info (containerd: pid, the OCI runtime spec, ...)."""
        request = pb.ContainerStatusRequest(container_id=_id_and_name(container)[0], verbose=True)
        info: dict[str, Any] = json.loads(self.runtime.ContainerStatus(request, timeout=self.timeout).info["info"])
        return info

    def pid(self, container: Container) -> int:
        """The host pid of the container's init process."""
        pid = self.info(container).get("pid")
        if not isinstance(pid, int) or pid <= 0:
            raise CriError(f"container {container.name} has no running process (pid {pid!r})")
        return pid

    def allowed_inside(self, container: Container | str) -> Allowed:
        """The cpus and mems a new process in the container gets, as it sees them itself."""
        return Allowed.parse(self.exec_sync(container, ["cat", "/proc/self/status"]).stdout)

    def allowed_on_host(self, container: Container) -> Allowed:
        """The cpus and mems of the container's init process, read from the host's /proc."""
        return Allowed.of_pid(self.pid(container))

    def remove_pod(self, pod: Pod) -> None:
        """StopPodSandbox (kills its containers at once) and RemovePodSandbox (removes them)."""
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=self.timeout)
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=self.timeout)
        self._pods.pop(pod.id, None)

    def cleanup(self) -> None:
        """Remove every pod this client started; the first failure is raised after trying them all."""
        errors: list[Exception] = []
        for pod in list(self._pods.values()):
            try:
                self.remove_pod(pod)
            except grpc.RpcError as e:
                errors.append(e)
        if errors:
            raise CriError(f"could not remove {len(errors)} pod(s)") from errors[0]

    def close(self) -> None:
        self._channel.close()


def _id_and_name(container: Container | str) -> tuple[str, str]:
    """A container's id, and how failure messages name it."""
    return (container, container[:12]) if isinstance(container, str) else (container.id, container.name)
