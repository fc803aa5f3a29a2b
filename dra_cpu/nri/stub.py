"""A generic NRI plugin connection (what containerd's Go `stub` package is to Go plugins): dial the runtime's
socket, register, answer the runtime's calls through a handler, reconnect with backoff when the runtime restarts.

The plugin speaks NRI 0.12.3's API (protos/nri), which older runtimes understand too: NRI 0.12 runtimes deliver
StartContainer and RemoveContainer through RPCs of their own, older ones as StateChange events, and both forms
reach the handler through one dispatch (`_container_event`). Both are served because a 0.12 runtime whose plugin
answers an own RPC UNIMPLEMENTED falls back to StateChange at the cost of a round trip and a deprecation warning.

Threads: the transport's reader answers the runtime's calls inline through the handler; the connector keeps a
connection up. `ready` is set once the runtime has synchronized with the plugin and cleared when the connection
drops. The handler must never call the runtime from inside one of its callbacks (the runtime waits for the
callback's answer while it handles the call: a deadlock in NRI before containerd/nri#301).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from google.protobuf.message import Message

from dra_cpu.errors import DraCpuError
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.transport import UNIMPLEMENTED, Connection, MethodError, TransportError

LOG = logging.getLogger("dra_cpu.nri")

RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
NRI_API_VERSION = "v0.12.3"
"""The NRI release whose API protos/nri follows; sent at registration, where NRI 0.12 runtimes log it."""
_INDEX = re.compile(r"^\d\d$")


def event_mask(events: Sequence[int]) -> int:
    mask = 0
    for event in events:
        mask |= 1 << (event - 1)
    return mask


@dataclass(frozen=True)
class StubConfig:
    socket: Path
    plugin_name: str
    plugin_index: str
    call_timeout: float
    backoff_initial: float
    backoff_max: float

    def check(self) -> None:
        if not _INDEX.match(self.plugin_index):
            raise DraCpuError(f"--nri-plugin-index {self.plugin_index!r}: must be two digits, 00 to 99")
        if not self.plugin_name or any(c.isspace() or c == "/" for c in self.plugin_name):
            raise DraCpuError(f"NRI plugin name {self.plugin_name!r}: must be non-empty, without spaces or '/'")


class Handler(Protocol):
    """What a plugin answers. Each callback runs on the transport's reader thread and must return quickly.

    Besides these, a handler takes the container events it implements a method for (EVENT_METHODS, with the
    signatures of ContainerEvents); the stub subscribes to exactly those."""

    def configured(self, request: api.ConfigureRequest) -> None:
        """The runtime introduced itself (name, version, NRI version where it sends one)."""
        ...

    def synchronize(
        self, pods: Sequence[api.PodSandbox], containers: Sequence[api.Container]
    ) -> list[api.ContainerUpdate]:
        """The runtime's whole state (after every (re)connection): the updates that reconcile it."""
        ...

    def disconnected(self, stopping: bool) -> None:
        """The connection dropped (`stopping`: because the plugin stops); a Synchronize follows a reconnection."""
        ...


class ContainerEvents(Protocol):
    """The container events a handler may implement, each subscribed to only when it does."""

    def create_container(self, request: api.CreateContainerRequest) -> api.ContainerAdjustment:
        """Raise MethodError to refuse the container."""
        ...

    def update_container(self, request: api.UpdateContainerRequest) -> list[api.ContainerUpdate]: ...

    def start_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        """The runtime is about to start the container (NRI StartContainer): its cgroup exists (CRI CreateContainer
        only records the container; the OCI runtime creates it at start), its own process has not run yet."""
        ...

    def stop_container(self, request: api.StopContainerRequest) -> None: ...

    def remove_container(self, pod: api.PodSandbox, container: api.Container) -> None: ...


EVENT_METHODS: dict[int, str] = {
    api.CREATE_CONTAINER: "create_container",
    api.START_CONTAINER: "start_container",
    api.UPDATE_CONTAINER: "update_container",
    api.STOP_CONTAINER: "stop_container",
    api.REMOVE_CONTAINER: "remove_container",
}
"""Each container event, by the ContainerEvents method that takes it."""


def events_of(handler: object) -> tuple[int, ...]:
    """The events a handler (or its class) implements a method for: what the plugin subscribes to."""
    return tuple(event for event, name in EVENT_METHODS.items() if callable(getattr(handler, name, None)))


class _PodAndContainer(Protocol):
    """What StateChangeEvent and the container events' own requests have in common (at different numbers)."""

    @property
    def pod(self) -> api.PodSandbox: ...

    @property
    def container(self) -> api.Container: ...


class Stub:
    def __init__(self, config: StubConfig, handler: Handler) -> None:
        self.config = config
        self.handler = handler
        self.ready = threading.Event()
        self.calls: Counter[str] = Counter()
        """How often the runtime called each plugin method: shows which events a runtime delivers through their own
        RPCs (NRI 0.12) and which as StateChange. Written by the transport's reader only."""
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._sync_pods: list[api.PodSandbox] = []
        self._sync_containers: list[api.Container] = []
        self._thread = threading.Thread(target=self._connect_loop, name="nri-connect", daemon=True)
        self.events = events_of(handler)
        # Called only for the events in self.events, whose methods the handler has.
        self._on: ContainerEvents = cast(ContainerEvents, handler)
        self._container_events: dict[int, Callable[[api.PodSandbox, api.Container], None]] = {
            event: getattr(handler, EVENT_METHODS[event])
            for event in (api.START_CONTAINER, api.REMOVE_CONTAINER)
            if event in self.events
        }
        rpcs: dict[str, tuple[int, Callable[[bytes], bytes]]] = {
            "CreateContainer": (api.CREATE_CONTAINER, self._create_container),
            "UpdateContainer": (api.UPDATE_CONTAINER, self._update_container),
            "StopContainer": (api.STOP_CONTAINER, self._stop_container),
            "StartContainer": (
                api.START_CONTAINER,
                self._event_rpc(
                    api.START_CONTAINER, api.StartContainerRequest.FromString, api.StartContainerResponse()
                ),
            ),
            "RemoveContainer": (
                api.REMOVE_CONTAINER,
                self._event_rpc(
                    api.REMOVE_CONTAINER, api.RemoveContainerRequest.FromString, api.RemoveContainerResponse()
                ),
            ),
        }
        self._methods: dict[str, Callable[[bytes], bytes]] = {
            "Configure": self._configure,
            "Synchronize": self._synchronize,
            "StateChange": self._state_change,
            "Shutdown": self._shutdown,
            **{method: serve for method, (event, serve) in rpcs.items() if event in self.events},
        }

    def start(self) -> None:
        LOG.info(
            "starting NRI plugin",
            extra={
                "socket": str(self.config.socket),
                "plugin": self.config.plugin_name,
                "index": self.config.plugin_index,
            },
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        if self._thread.is_alive():
            self._thread.join()
        self.ready.clear()

    def update_containers(self, updates: Sequence[api.ContainerUpdate]) -> list[api.ContainerUpdate]:
        """Runtime.UpdateContainers; returns the updates the runtime reports failed. Never from a callback."""
        conn = self._conn
        if conn is None:
            raise TransportError("not connected to the runtime")
        request = api.UpdateContainersRequest(update=updates)
        raw = conn.call(RUNTIME_SERVICE, "UpdateContainers", request.SerializeToString(), self.config.call_timeout)
        return list(api.UpdateContainersResponse.FromString(raw).failed)

    def _connect_loop(self) -> None:
        backoff = self.config.backoff_initial
        while not self._stop.is_set():
            try:
                conn = Connection.dial(str(self.config.socket), self._handle)
            except OSError as err:
                LOG.warning(
                    "cannot connect to NRI; retrying",
                    extra={"socket": str(self.config.socket), "reason": err.strerror or str(err), "retryIn": backoff},
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max)
                continue
            self._conn = conn
            conn.start()
            if self._register(conn):
                backoff = self.config.backoff_initial
            while not conn.closed.wait(0.2):
                if self._stop.is_set():
                    conn.close()
            conn.close()
            self.ready.clear()
            self._sync_pods, self._sync_containers = [], []
            self.handler.disconnected(self._stop.is_set())
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.config.backoff_max)

    def _register(self, conn: Connection) -> bool:
        request = api.RegisterPluginRequest(
            plugin_name=self.config.plugin_name, plugin_idx=self.config.plugin_index, NRI_version=NRI_API_VERSION
        )
        try:
            conn.call(RUNTIME_SERVICE, "RegisterPlugin", request.SerializeToString(), self.config.call_timeout)
        except TransportError as err:
            LOG.error("NRI registration failed", extra={"reason": str(err)})
            conn.close()
            return False
        LOG.info("registered with the runtime", extra={"plugin": self.config.plugin_name})
        return True

    def _handle(self, service: str, method: str, payload: bytes) -> bytes:
        if service != PLUGIN_SERVICE or method not in self._methods:
            LOG.warning("unknown NRI method called", extra={"service": service, "method": method})
            raise MethodError(UNIMPLEMENTED, f"{service}/{method} is not implemented by {self.config.plugin_name}")
        self.calls[method] += 1
        return self._methods[method](payload)

    def _configure(self, payload: bytes) -> bytes:
        request = api.ConfigureRequest.FromString(payload)
        LOG.info(
            "configured by the runtime",
            extra={
                "runtime": request.runtime_name,
                "runtimeVersion": request.runtime_version,
                "nriVersion": request.NRI_version or "unknown",
                "requestTimeoutMs": request.request_timeout,
            },
        )
        self.handler.configured(request)
        return api.ConfigureResponse(events=event_mask(self.events)).SerializeToString()

    def _synchronize(self, payload: bytes) -> bytes:
        request = api.SynchronizeRequest.FromString(payload)
        self._sync_pods.extend(request.pods)
        self._sync_containers.extend(request.containers)
        if request.more:
            return api.SynchronizeResponse(more=True).SerializeToString()
        pods, containers = self._sync_pods, self._sync_containers
        self._sync_pods, self._sync_containers = [], []
        updates = self.handler.synchronize(pods, containers)
        self.ready.set()
        return api.SynchronizeResponse(update=updates).SerializeToString()

    def _create_container(self, payload: bytes) -> bytes:
        adjust = self._on.create_container(api.CreateContainerRequest.FromString(payload))
        return api.CreateContainerResponse(adjust=adjust).SerializeToString()

    def _update_container(self, payload: bytes) -> bytes:
        updates = self._on.update_container(api.UpdateContainerRequest.FromString(payload))
        return api.UpdateContainerResponse(update=updates).SerializeToString()

    def _stop_container(self, payload: bytes) -> bytes:
        self._on.stop_container(api.StopContainerRequest.FromString(payload))
        return api.StopContainerResponse().SerializeToString()

    def _event_rpc(
        self, event: int, parse: Callable[[bytes], _PodAndContainer], answer: Message
    ) -> Callable[[bytes], bytes]:
        """An event's own RPC (NRI 0.12), served like its StateChange form."""
        response = answer.SerializeToString()

        def serve(payload: bytes) -> bytes:
            request = parse(payload)
            self._container_event(event, request.pod, request.container)
            return response

        return serve

    def _state_change(self, payload: bytes) -> bytes:
        event = api.StateChangeEvent.FromString(payload)
        self._container_event(event.event, event.pod, event.container)
        return api.Empty().SerializeToString()

    def _container_event(self, event: int, pod: api.PodSandbox, container: api.Container) -> None:
        callback = self._container_events.get(event)
        if callback is not None:
            callback(pod, container)

    def _shutdown(self, payload: bytes) -> bytes:
        LOG.warning("the runtime asked the plugin to shut down; it will reconnect")
        return api.Empty().SerializeToString()
