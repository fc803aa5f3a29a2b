"""The NRI transport against a fake runtime on the other end of a socketpair: framing, calls both ways, bad input."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from google.rpc import status_pb2

from dra_cpu.nri import transport
from dra_cpu.nri.gen import nri_ttrpc_pb2
from dra_cpu.nri.transport import (
    INTERNAL,
    INVALID_ARGUMENT,
    PLUGIN_CONN,
    RESOURCE_EXHAUSTED,
    RUNTIME_CONN,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    UNIMPLEMENTED,
    Connection,
    ConnectionClosed,
    Decoder,
    MethodError,
    ProtocolError,
    TransportError,
)
from tests.harness.runtimes.nri_peer import SERVICE, Peer


def echo(service: str, method: str, payload: bytes) -> bytes:
    if method == "Echo":
        return payload
    if method == "Broken":
        raise ValueError("bug")
    raise MethodError(UNIMPLEMENTED, f"{method} unknown")


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Peer]]:
    ours, theirs = socket.socketpair()
    conn = Connection(ours, echo, name="test")
    conn.start()
    yield conn, Peer(theirs)
    conn.close()
    theirs.close()


def call_in_thread(conn: Connection, method: str, timeout: float = 5.0) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = conn.call("nri.pkg.api.v1alpha1.Runtime", method, b"req", timeout)
        except TransportError as err:
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_serves_the_runtime_while_its_own_call_is_pending(pair: tuple[Connection, Peer]) -> None:
    conn, peer = pair
    thread, outcome = call_in_thread(conn, "RegisterPlugin")
    register = peer.read()
    assert (register.conn, register.type) == (RUNTIME_CONN, TYPE_REQUEST) and register.stream % 2 == 1
    envelope = nri_ttrpc_pb2.Request.FromString(register.payload)
    assert (envelope.method, envelope.payload) == ("RegisterPlugin", b"req")
    # containerd 1.7: Configure comes before the answer to RegisterPlugin.
    peer.request(1, "Echo", b"configure")
    assert peer.read_response(1).payload == b"configure"
    peer.respond(register.stream, b"registered")
    thread.join(5)
    assert outcome == {"result": b"registered"}


def test_messages_split_over_frames_and_bytes(pair: tuple[Connection, Peer]) -> None:
    _conn, peer = pair
    body = nri_ttrpc_pb2.Request(service=SERVICE, method="Echo", payload=b"x" * 100_000).SerializeToString()
    message = struct.pack(">IIBB", len(body), 3, TYPE_REQUEST, 0) + body
    frames = b"".join(
        struct.pack(">II", PLUGIN_CONN, len(message[i : i + 7000])) + message[i : i + 7000]
        for i in range(0, len(message), 7000)
    )
    for i in range(0, len(frames), 997):
        peer.send_raw(frames[i : i + 997])
    assert peer.read_response(3).payload == b"x" * 100_000


def test_unknown_method_and_handler_bug_get_error_statuses(pair: tuple[Connection, Peer]) -> None:
    _conn, peer = pair
    peer.request(1, "Nope")
    assert peer.read_response(1).status.code == UNIMPLEMENTED
    peer.request(3, "Broken")
    assert peer.read_response(3).status.code == INTERNAL
    peer.send_raw(transport.encode(PLUGIN_CONN, 5, TYPE_REQUEST, b"\xff\xff\xff"))
    assert peer.read_response(5).status.code == INVALID_ARGUMENT
    peer.request(7, "Echo", b"still alive")
    assert peer.read_response(7).payload == b"still alive"


def test_oversized_message_is_refused_and_the_stream_goes_on(pair: tuple[Connection, Peer]) -> None:
    _conn, peer = pair
    huge = transport.MAX_MESSAGE + 1000
    message = struct.pack(">IIBB", huge, 9, TYPE_REQUEST, 0) + b"\0" * huge
    chunk = transport.MAX_MUX_PAYLOAD
    sender = threading.Thread(
        target=lambda: peer.send_raw(
            b"".join(
                struct.pack(">II", PLUGIN_CONN, len(message[i : i + chunk])) + message[i : i + chunk]
                for i in range(0, len(message), chunk)
            )
        )
    )
    sender.start()
    response = peer.read_response(9)
    sender.join()
    assert response.status.code == RESOURCE_EXHAUSTED
    peer.request(11, "Echo", b"after")
    assert peer.read_response(11).payload == b"after"


def test_unknown_mux_connection_is_dropped(pair: tuple[Connection, Peer], caplog: pytest.LogCaptureFixture) -> None:
    _conn, peer = pair
    peer.send_raw(struct.pack(">II", 7, 3) + b"abc")
    peer.request(1, "Echo", b"ok")
    assert peer.read_response(1).payload == b"ok"
    assert "unknown connection" in caplog.text


def test_garbage_closes_the_connection_and_fails_pending_calls(
    pair: tuple[Connection, Peer], caplog: pytest.LogCaptureFixture
) -> None:
    conn, peer = pair
    thread, outcome = call_in_thread(conn, "UpdateContainers")
    peer.read()
    with caplog.at_level(logging.WARNING):
        peer.send_raw(b"GET / HTTP/1.1\r\nHost: nri\r\n\r\n")
        thread.join(5)
    assert isinstance(outcome["error"], ConnectionClosed)
    assert "claims" in str(outcome["error"])
    assert conn.closed.is_set()
    assert "NRI connection closed" in caplog.text
    with pytest.raises(ConnectionClosed):
        conn.call("s", "m", b"", 1)


def test_runtime_closing_mid_call_and_mid_frame(pair: tuple[Connection, Peer]) -> None:
    conn, peer = pair
    thread, outcome = call_in_thread(conn, "UpdateContainers")
    request = peer.read()
    frame = transport.encode(RUNTIME_CONN, request.stream, TYPE_RESPONSE, transport.response_body(b"x" * 50))
    peer.send_raw(frame[:20])
    peer.sock.close()
    thread.join(5)
    assert isinstance(outcome["error"], ConnectionClosed)
    assert "middle of a frame" in str(outcome["error"])


def test_error_status_and_timeout_of_own_calls(pair: tuple[Connection, Peer]) -> None:
    conn, peer = pair
    thread, outcome = call_in_thread(conn, "UpdateContainers")
    peer.respond(peer.read().stream, code=5)
    thread.join(5)
    assert "answered 5" in str(outcome["error"])
    with pytest.raises(TransportError, match="no answer"):
        conn.call("nri.pkg.api.v1alpha1.Runtime", "UpdateContainers", b"", 0.1)
    # A late answer to the call that timed out is logged and ignored.
    peer.respond(peer.read().stream, b"late")
    peer.request(1, "Echo", b"fine")
    assert peer.read_response(1).payload == b"fine"


def test_close_fails_pending_calls_and_stops_the_reader(pair: tuple[Connection, Peer]) -> None:
    conn, peer = pair
    thread, outcome = call_in_thread(conn, "UpdateContainers")
    peer.read()
    conn.close()
    thread.join(5)
    assert isinstance(outcome["error"], ConnectionClosed)
    assert not conn._reader.is_alive()


def test_decoder_rejects_frames_over_the_limit() -> None:
    with pytest.raises(ProtocolError, match=str(transport.MAX_MUX_PAYLOAD)):
        list(Decoder().feed(struct.pack(">II", 1, transport.MAX_MUX_PAYLOAD + 1)))


def test_status_travels_in_the_response_envelope() -> None:
    body = transport.response_body(code=RESOURCE_EXHAUSTED, message="too big")
    assert nri_ttrpc_pb2.Response.FromString(body).status == status_pb2.Status(code=8, message="too big")
