"""Plugin registration: where the sockets are, and the Registration service the kubelet calls on the
registration socket (GetInfo, NotifyRegistrationStatus)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dra_cpu.kubelet.gen import pluginregistration_v1_pb2, pluginregistration_v1_pb2_grpc
from dra_cpu.kubelet.services import DRA_SERVICES, HEALTH_SERVICES

LOG = logging.getLogger("dra_cpu.kubelet")
# The gRPC services on the DRA socket, "<proto package>.<service>". The kubelet takes the first DRAPlugin entry it
# knows, in this order, and, independently, the newest health service it knows (1.37: v1, else v1alpha1).
SUPPORTED_SERVICES = (*DRA_SERVICES, *HEALTH_SERVICES)


@dataclass(frozen=True)
class PluginPaths:
    kubelet_root: Path
    driver: str

    @property
    def registration_socket(self) -> Path:
        return self.kubelet_root / "plugins_registry" / f"{self.driver}-reg.sock"

    @property
    def plugin_dir(self) -> Path:
        """`<kubeletRoot>/plugins/<driver>`: the DRA socket, and the device metadata files (KEP-5304)."""
        return self.kubelet_root / "plugins" / self.driver

    @property
    def dra_socket(self) -> Path:
        return self.plugin_dir / "dra.sock"


class RegistrationService(pluginregistration_v1_pb2_grpc.RegistrationServicer):
    def __init__(self, paths: PluginPaths, registered: threading.Event, status: Callable[[bool], None]) -> None:
        self.paths = paths
        self.registered = registered
        self.status = status

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pluginregistration_v1_pb2.PluginInfo(
            type="DRAPlugin",
            name=self.paths.driver,
            endpoint=str(self.paths.dra_socket),
            supported_versions=list(SUPPORTED_SERVICES),
        )

    def NotifyRegistrationStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.plugin_registered:
            LOG.info("registered with the kubelet", extra={"driver": self.paths.driver})
            self.registered.set()
            self.status(True)
        else:
            LOG.error("the kubelet refused registration; retrying", extra={"reason": request.error})
            self.registered.clear()
            self.status(False)
        return pluginregistration_v1_pb2.RegistrationStatusResponse()
