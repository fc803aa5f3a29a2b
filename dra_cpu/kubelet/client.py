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
from dra_cpu.kubelet.gen import pluginregistration_v1_pb2, pluginregistration_v1_pb2_grpc
from dra_cpu.kubelet.services import DRA_SERVICES, HEALTH_SERVICES


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
            service = next((s for s in info.supported_versions if s in DRA_SERVICES), None)
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
        health = next((s for s in HEALTH_SERVICES if s in info.supported_versions), "")
        channel = grpc.insecure_channel(f"unix://{info.endpoint}")
        return cls(info=info, channel=channel, service=service, health_service=health)

    def _api(self, service: str | None) -> tuple[ModuleType, Any]:
        pb2, grpc_mod = DRA_SERVICES[service or self.service]
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
        if chosen not in HEALTH_SERVICES:
            raise KubeletError(f"no health service this kubelet knows: {list(self.info.supported_versions)}")
        pb2, grpc_mod = HEALTH_SERVICES[chosen]
        stub = grpc_mod.DRAResourceHealthStub(self.channel)
        return stub.NodeWatchResources(pb2.NodeWatchResourcesRequest(), timeout=timeout)

    def close(self) -> None:
        self.channel.close()
