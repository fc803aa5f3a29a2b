"""The kubelet side: plugin registration, DRA v1 and v1beta1, and the device-health stream, over unix sockets.

Protocol adapters only: requests become ClaimRefs for the Driver, and its results become responses. v1 and
v1beta1 differ only in package and in v1's share_id, so one servicer serves both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from dra_cpu import cdi
from dra_cpu.claims import ClaimRef
from dra_cpu.devices import DeviceType
from dra_cpu.driver import Driver
from dra_cpu.errors import DraCpuError
from dra_cpu.kubelet.gen import (
    dra_health_v1alpha1_pb2,
    dra_health_v1alpha1_pb2_grpc,
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    pluginregistration_v1_pb2,
    pluginregistration_v1_pb2_grpc,
)

LOG = logging.getLogger("dra_cpu.kubelet")
SUPPORTED_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth")
# The kubelet marks a device Unknown after 30 s without news: resend the full list well before that.
HEALTH_RESEND_SECONDS = 10.0
# AF_UNIX paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# After a refusal the registration socket is made anew (the kubelet registers every new socket), with backoff.
REGISTRATION_RETRY_SECONDS = (1.0, 60.0)


@dataclass(frozen=True)
class PluginPaths:
    kubelet_root: Path
    driver: str

    @property
    def registration_socket(self) -> Path:
        return self.kubelet_root / "plugins_registry" / f"{self.driver}-reg.sock"

    @property
    def dra_socket(self) -> Path:
        return self.kubelet_root / "plugins" / self.driver / "dra.sock"


class DRAService(dra_v1_pb2_grpc.DRAPluginServicer, dra_v1beta1_pb2_grpc.DRAPluginServicer):
    """NodePrepareResources / NodeUnprepareResources for one API version (its generated module `pb2`)."""

    def __init__(self, driver: Driver, pb2: ModuleType) -> None:
        self.driver = driver
        self.pb2 = pb2
        self.has_share_id = "share_id" in pb2.Device.DESCRIPTOR.fields_by_name

    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.pb2.NodePrepareResourcesResponse()
        refs, invalid = _refs(request.claims)
        for uid, error in invalid.items():
            response.claims[uid].error = error
        for uid, result in self.driver.prepare(refs).items():
            out = response.claims[uid]
            if result.claim is None:
                out.error = result.error
                continue
            for device in result.claim.devices:
                item = out.devices.add(
                    request_names=list(device.request_names),
                    pool_name=device.pool,
                    device_name=device.device,
                    cdi_device_ids=[cdi.device_id(self.driver.config.driver_name, uid)],
                )
                if self.has_share_id and device.share_id:
                    item.share_id = device.share_id
        return response

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.pb2.NodeUnprepareResourcesResponse()
        refs, invalid = _refs(request.claims)
        for uid, error in invalid.items():
            response.claims[uid].error = error
        for uid, error in self.driver.unprepare(refs).items():
            response.claims[uid].error = error
        return response


def _refs(claims: Any) -> tuple[list[ClaimRef], dict[str, str]]:
    refs, invalid = [], {}
    for claim in claims:
        missing = [f for f in ("namespace", "uid", "name") if not getattr(claim, f)]
        if missing:
            invalid[claim.uid] = f"claim {claim.namespace}/{claim.name} (uid {claim.uid!r}): empty {', '.join(missing)}"
        else:
            refs.append(ClaimRef(namespace=claim.namespace, name=claim.name, uid=claim.uid))
    return refs, invalid


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


class HealthService(dra_health_v1alpha1_pb2_grpc.DRAResourceHealthServicer):
    """The complete list of every device ever published, healthy while all of its CPUs are online."""

    def __init__(self, driver: Driver, stop: threading.Event, resend_seconds: float = HEALTH_RESEND_SECONDS) -> None:
        self.driver = driver
        self.stop = stop
        self.resend_seconds = resend_seconds
        self.changed = threading.Condition()
        # Every device this driver published: a device that disappears must be reported, not forgotten.
        self.known: set[str] = {d.name for d in driver.devices}

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def snapshot(self) -> Any:
        pb = dra_health_v1alpha1_pb2
        topology = self.driver.topology
        current = {d.name: d for d in self.driver.devices}
        with self.changed:
            self.known.update(current)
            known = sorted(self.known)
        now = int(time.time())
        response = pb.NodeWatchResourcesResponse()
        for name in known:
            device = current.get(name)
            held = [c.cpus for c in self.driver.state.claims.values() for d in c.devices if d.device == name]
            offline = [str(cpus - topology.online_cpus) for cpus in held if not cpus.issubset(topology.online_cpus)]
            if offline:
                health, message = pb.UNHEALTHY, f"prepared CPUs {', '.join(offline)} are offline"
            elif device is None:
                health, message = pb.UNHEALTHY, "the device's CPUs or memory are gone from the node"
            elif device.type is DeviceType.CPU and not device.cpus.issubset(topology.online_cpus):
                health, message = pb.UNHEALTHY, f"CPUs {device.cpus - topology.online_cpus} are offline"
            else:
                health, message = pb.HEALTHY, ""
            response.devices.add(
                device=pb.DeviceIdentifier(pool_name=self.driver.config.node_name, device_name=name),
                health=health,
                last_updated_time=now,
                message=message,
            )
        return response

    def NodeWatchResources(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        while context.is_active() and not self.stop.is_set():
            yield self.snapshot()
            with self.changed:
                self.changed.wait(self.resend_seconds)


@dataclass
class KubeletPlugin:
    """The two sockets: the DRA service first, then the registration socket the kubelet watches for."""

    driver: Driver
    paths: PluginPaths
    stop_event: threading.Event
    registered: threading.Event
    workers: int = 16
    retry_seconds: tuple[float, float] = REGISTRATION_RETRY_SECONDS

    def __post_init__(self) -> None:
        self.health = HealthService(self.driver, self.stop_event)
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
                    lambda s: dra_v1_pb2_grpc.add_DRAPluginServicer_to_server(DRAService(self.driver, dra_v1_pb2), s),
                    lambda s: dra_v1beta1_pb2_grpc.add_DRAPluginServicer_to_server(
                        DRAService(self.driver, dra_v1beta1_pb2), s
                    ),
                    lambda s: dra_health_v1alpha1_pb2_grpc.add_DRAResourceHealthServicer_to_server(self.health, s),
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
