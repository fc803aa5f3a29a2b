"""The runtime's side of an NRI connection, as raw frames: for transport and enforcer tests and hack/bench/nri.py."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message as ProtoMessage
from google.rpc import status_pb2

from dra_cpu.nri import transport
from dra_cpu.nri.enforcer import EVENTS
from dra_cpu.nri.gen import nri_ttrpc_pb2
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.stub import event_mask
from dra_cpu.nri.transport import PLUGIN_CONN, RUNTIME_CONN, TYPE_REQUEST, TYPE_RESPONSE, Decoder, Message, Oversized

SERVICE = "nri.pkg.api.v1alpha1.Plugin"


M = TypeVar("M", bound=ProtoMessage)

OWN_RPCS: dict[
    api.Event.ValueType, tuple[str, type[api.StartContainerRequest | api.RemoveContainerRequest], ProtoMessage]
] = {
    api.START_CONTAINER: ("StartContainer", api.StartContainerRequest, api.StartContainerResponse()),
    api.REMOVE_CONTAINER: ("RemoveContainer", api.RemoveContainerRequest, api.RemoveContainerResponse()),
}
"""The container events an NRI 0.12 runtime delivers through RPCs of their own: method, request, expected answer."""


class Peer:
    """The runtime's side: raw frames in and out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.decoder = Decoder()
        self.queue: list[Message | Oversized] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, stream: int, method: str, payload: bytes = b"", service: str = SERVICE) -> None:
        body = nri_ttrpc_pb2.Request(service=service, method=method, payload=payload).SerializeToString()
        self.send_raw(transport.encode(PLUGIN_CONN, stream, TYPE_REQUEST, body))

    def respond(self, stream: int, payload: bytes = b"", code: int = 0) -> None:
        self.send_raw(transport.encode(RUNTIME_CONN, stream, TYPE_RESPONSE, transport.response_body(payload, code)))

    def read(self) -> Message:
        while not self.queue:
            data = self.sock.recv(1 << 16)
            assert data, "plugin closed the connection"
            self.queue.extend(self.decoder.feed(data))
        item = self.queue.pop(0)
        assert isinstance(item, Message)
        return item

    def read_response(self, stream: int) -> nri_ttrpc_pb2.Response:
        message = self.read()
        assert (message.conn, message.stream, message.type) == (PLUGIN_CONN, stream, TYPE_RESPONSE)
        return nri_ttrpc_pb2.Response.FromString(message.payload)


class Runtime:
    """A scripted runtime: accepts the plugin, answers its registration, makes calls and reads the answers."""

    def __init__(self, path: Path, plugin_index: str = "07") -> None:
        self.plugin_index = plugin_index
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(5)
        self.peer: Peer | None = None
        self.stream = 1
        self.registered = api.RegisterPluginRequest()

    def accept(self, nri_version: str = "") -> Peer:
        self.peer = Peer(self.listener.accept()[0])
        register = self.peer.read()
        request = nri_ttrpc_pb2.Request.FromString(register.payload)
        self.registered = api.RegisterPluginRequest.FromString(request.payload)
        assert self.registered.plugin_idx == self.plugin_index
        configure = api.ConfigureRequest(runtime_name="fake", NRI_version=nri_version)
        response = self.call("Configure", configure, api.ConfigureResponse)
        assert isinstance(response, api.ConfigureResponse), response
        assert response.events == event_mask(EVENTS)
        self.peer.respond(register.stream)
        return self.peer

    def call(self, method: str, request: ProtoMessage, response_type: type[M]) -> M | status_pb2.Status:
        """The plugin's answer: a `response_type`, or the error status it answered with instead."""
        assert self.peer is not None
        stream, self.stream = self.stream, self.stream + 2
        self.peer.request(stream, method, request.SerializeToString())
        response = self.peer.read_response(stream)
        if response.status.code:
            return response.status
        return response_type.FromString(response.payload)

    def container_event(
        self, event: api.Event.ValueType, pod: api.PodSandbox, container: api.Container, own_rpc: bool
    ) -> None:
        """Deliver a container event as an NRI 0.12 runtime does (`own_rpc`) or as older ones do (StateChange), and
        check the plugin answers with that call's (empty) response rather than an error."""
        if own_rpc:
            method, request_type, expected = OWN_RPCS[event]
            answer = self.call(method, request_type(pod=pod, container=container), type(expected))
        else:
            expected = api.Empty()
            answer = self.call(
                "StateChange", api.StateChangeEvent(event=event, pod=pod, container=container), api.Empty
            )
        assert answer == expected, answer
