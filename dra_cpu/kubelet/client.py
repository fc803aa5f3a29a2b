"""The kubelet's half of the conversation, for the demo, the tests and the benchmarks: it registers a plugin the
way the kubelet does (GetInfo within 1 s, then NotifyRegistrationStatus) and calls NodePrepareResources and
NodeUnprepareResources on the endpoint the plugin named."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from dra_cpu.core.claims import ClaimRef
from dra_cpu.errors import DraCpuError
from dra_cpu.kubelet.gen import (
    dra_health_v1_pb2,
    dra_health_v1_pb2_grpc,
    dra_health_v1alpha1_pb2,
    dra_health_v1alpha1_pb2_grpc,
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    pluginregistration_v1_pb2,
    pluginregistration_v1_pb2_grpc,
)

# What a 1.34+ kubelet knows, in its order of preference.
KUBELET_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
_API = {"v1.DRAPlugin": (dra_v1_pb2, dra_v1_pb2_grpc), "v1beta1.DRAPlugin": (dra_v1beta1_pb2, dra_v1beta1_pb2_grpc)}
# The health services a 1.37 kubelet knows, newest first: it takes the first one the plugin advertises.
KUBELET_HEALTH_SERVICES = ("v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth")
_HEALTH_API = {
    "v1.DRAResourceHealth": (dra_health_v1_pb2, dra_health_v1_pb2_grpc),
    "v1alpha1.DRAResourceHealth": (dra_health_v1alpha1_pb2, dra_health_v1alpha1_pb2_grpc),
}


class KubeletError(DraCpuError):
    pass


@dataclass
class KubeletClient:
    """One registered plugin, as the kubelet's plugin manager holds it."""

    info: Any
    channel: grpc.Channel
    service: str
    # "" when the plugin advertises no health service this kubelet knows.
    health_service: str = ""

    @classmethod
    def register(cls, registration_socket: Path, timeout: float = 1.0, accept: bool = True) -> KubeletClient:
        """GetInfo, then NotifyRegistrationStatus; `accept=False` refuses as a kubelet does when validation fails."""
        with grpc.insecure_channel(f"unix://{registration_socket}") as channel:
            stub = pluginregistration_v1_pb2_grpc.RegistrationStub(channel)
            try:
                info = stub.GetInfo(pluginregistration_v1_pb2.InfoRequest(), timeout=timeout)
            except grpc.RpcError as err:
                raise KubeletError(f"GetInfo on {registration_socket} failed: {err.code().name}") from None
            service = next((s for s in info.supported_versions if s in KUBELET_SERVICES), None)
            if info.type != "DRAPlugin" or not service:
                error = f"unsupported plugin {info.type} {list(info.supported_versions)}"
            else:
                error = "" if accept else "refused by this kubelet"
            stub.NotifyRegistrationStatus(
                pluginregistration_v1_pb2.RegistrationStatus(plugin_registered=not error, error=error),
                timeout=5,
            )
        if error:
            raise KubeletError(error)
        assert service is not None
        health = next((s for s in KUBELET_HEALTH_SERVICES if s in info.supported_versions), "")
        channel = grpc.insecure_channel(f"unix://{info.endpoint}")
        return cls(info=info, channel=channel, service=service, health_service=health)

    def _api(self, service: str | None) -> tuple[ModuleType, Any]:
        pb2, grpc_mod = _API[service or self.service]
        return pb2, grpc_mod.DRAPluginStub(self.channel)

    def prepare(self, claims: Iterable[ClaimRef], service: str | None = None, timeout: float = 45) -> Any:
        pb2, stub = self._api(service)
        request = pb2.NodePrepareResourcesRequest(
            claims=[pb2.Claim(namespace=c.namespace, uid=c.uid, name=c.name) for c in claims]
        )
        return stub.NodePrepareResources(request, timeout=timeout)

    def unprepare(self, claims: Iterable[ClaimRef], service: str | None = None, timeout: float = 45) -> Any:
        pb2, stub = self._api(service)
        request = pb2.NodeUnprepareResourcesRequest(
            claims=[pb2.Claim(namespace=c.namespace, uid=c.uid, name=c.name) for c in claims]
        )
        return stub.NodeUnprepareResources(request, timeout=timeout)

    def watch_health(self, timeout: float = 5, service: str | None = None) -> Any:
        """NodeWatchResources of the health service the kubelet chose at registration, or of `service`."""
        chosen = service or self.health_service
        if chosen not in _HEALTH_API:
            raise KubeletError(f"no health service this kubelet knows: {list(self.info.supported_versions)}")
        pb2, grpc_mod = _HEALTH_API[chosen]
        stub = grpc_mod.DRAResourceHealthStub(self.channel)
        return stub.NodeWatchResources(pb2.NodeWatchResourcesRequest(), timeout=timeout)

    def close(self) -> None:
        self.channel.close()
