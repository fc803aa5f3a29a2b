"""The kubelet side: the DRA socket (dra.py; health.py, v1 and v1alpha1) and the registration socket
(registration.py), served and re-made when the kubelet refuses a registration."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from dra_cpu.errors import DraCpuError
from dra_cpu.kubelet.dra import DRAService, Preparer
from dra_cpu.kubelet.gen import pluginregistration_v1_pb2_grpc
from dra_cpu.kubelet.health import MAX_HEALTH_STREAMS, HealthService, HealthServicer, Snapshots
from dra_cpu.kubelet.registration import PluginPaths, RegistrationService
from dra_cpu.kubelet.services import DRA_SERVICES, HEALTH_SERVICES

LOG = logging.getLogger("dra_cpu.kubelet")
# AF_UNIX paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# After a refusal the registration socket is made anew (the kubelet registers every new socket), with backoff.
REGISTRATION_RETRY_SECONDS = (1.0, 60.0)


class KubeletDriver(Preparer, Snapshots, Protocol):
    """What the plugin needs of the driver: prepare and unprepare, and snapshots for health."""


@dataclass
class KubeletPlugin:
    """The two sockets: the DRA service first, then the registration socket the kubelet watches for."""

    driver: KubeletDriver
    paths: PluginPaths
    stop_event: threading.Event
    registered: threading.Event
    workers: int = 16
    # Health streams each hold a worker while open: they get a few, and prepares keep the rest (health.py).
    health_streams: int = MAX_HEALTH_STREAMS
    retry_seconds: tuple[float, float] = REGISTRATION_RETRY_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.health_streams <= self.workers // 2:
            raise ValueError(f"health_streams {self.health_streams}: must leave most of {self.workers} workers")
        self.health = HealthService(self.driver, self.stop_event, max_streams=self.health_streams)
        self._servers: list[grpc.Server] = []
        self._registration: grpc.Server | None = None
        self._refusals = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for path in (self.paths.dra_socket, self.paths.registration_socket):
            if len(str(path)) > MAX_SOCKET_PATH:
                raise DraCpuError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes: use a shorter root")
        self._servers.append(
            self._serve(
                self.paths.dra_socket,
                (
                    *(
                        _adder(grpc_mod.add_DRAPluginServicer_to_server, DRAService(self.driver, pb2))
                        for pb2, grpc_mod in DRA_SERVICES.values()
                    ),
                    *(
                        _adder(grpc_mod.add_DRAResourceHealthServicer_to_server, HealthServicer(self.health, pb2))
                        for pb2, grpc_mod in HEALTH_SERVICES.values()
                    ),
                ),
            )
        )
        self._serve_registration()
        LOG.info(
            "kubelet plugin serving",
            extra={"dra": str(self.paths.dra_socket), "registration": str(self.paths.registration_socket)},
        )

    def _serve_registration(self) -> None:
        registration = RegistrationService(self.paths, self.registered, self._registration_status)
        self._registration = self._serve(
            self.paths.registration_socket,
            (lambda s: pluginregistration_v1_pb2_grpc.add_RegistrationServicer_to_server(registration, s),),
        )

    def _registration_status(self, registered: bool) -> None:
        with self._lock:
            if registered:
                self._refusals = 0
                return
            self._refusals += 1
            low, high = self.retry_seconds
            delay = min(high, low * 2 ** (self._refusals - 1))
        # Not from inside the refusing call: that runs on the server being replaced.
        timer = threading.Timer(delay, self._reregister)
        timer.daemon = True
        timer.start()

    def _reregister(self) -> None:
        with self._lock:
            if self.stop_event.is_set() or self.registered.is_set() or self._registration is None:
                return
            self._registration.stop(grace=1).wait()
            self._serve_registration()
        LOG.info("registration socket made anew for the kubelet", extra={"socket": str(self.paths.registration_socket)})

    def _serve(self, socket: Path, register: tuple[Callable[[grpc.Server], None], ...]) -> grpc.Server:
        try:
            socket.parent.mkdir(parents=True, exist_ok=True)
            # A socket left by a crashed driver would make bind fail; nobody else serves our path.
            socket.unlink(missing_ok=True)
        except OSError as err:
            raise DraCpuError(f"cannot prepare socket {socket}: {err.strerror}") from None
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="grpc"))
        for add in register:
            add(server)
        if not server.add_insecure_port(f"unix://{socket}"):
            raise DraCpuError(f"cannot listen on {socket}")
        server.start()
        socket.chmod(0o600)  # the kubelet (root) alone may call the driver
        return server

    def stop(self) -> None:
        # Removing the registration socket is how the kubelet learns the plugin is gone.
        self.paths.registration_socket.unlink(missing_ok=True)
        self.health.notify()
        with self._lock:
            servers = [*self._servers, *([self._registration] if self._registration else [])]
            self._registration = None
        for server in reversed(servers):
            server.stop(grace=2).wait()
        self.paths.dra_socket.unlink(missing_ok=True)


def _adder(add: Callable[[object, grpc.Server], None], servicer: object) -> Callable[[grpc.Server], None]:
    """What adds `servicer` to a server, by the generated `add_<Service>Servicer_to_server`."""
    return lambda server: add(servicer, server)
