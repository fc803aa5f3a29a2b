"""ttrpc over NRI's multiplexed unix connection: frames both ways, calls both ways, on one socket.

One stream socket carries two logical connections (mux frames `>II`: connection id, payload length): on connection 1
the runtime calls the plugin, on connection 2 the plugin calls the runtime. Each carries ttrpc messages (`>IIBB`:
length, stream id, type, flags, then a protobuf Request or Response envelope) that may span several mux frames, so
bytes are buffered per connection. One reader thread serves the runtime's requests inline and completes the plugin's
own pending calls; it must keep reading while a call is pending (containerd 1.7 sends Configure before it answers
RegisterPlugin), so a handler must never wait on the runtime itself.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from dra_cpu.errors import DraCpuError
from dra_cpu.nri.gen import nri_ttrpc_pb2

LOG = logging.getLogger("dra_cpu.nri.transport")

MUX_HEADER = struct.Struct(">II")
TTRPC_HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20
"""ttrpc's limit on one message; NRI bounds a mux frame to one such message and its header."""
MAX_MUX_PAYLOAD = TTRPC_HEADER.size + MAX_MESSAGE
PLUGIN_CONN = 1
RUNTIME_CONN = 2
TYPE_REQUEST = 1
TYPE_RESPONSE = 2

# google.rpc codes the runtime understands.
INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13


class TransportError(DraCpuError):
    """The connection to the runtime failed or a call did not succeed."""


class ConnectionClosed(TransportError):
    pass


class ProtocolError(TransportError):
    """Bytes that cannot be NRI framing: the stream cannot be resynchronized, so the connection is dropped."""


class MethodError(Exception):
    """Raised by a handler to answer the runtime with a status instead of a payload."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[str, str, bytes], bytes]
"""(service, method, request payload) -> response payload; raises MethodError to answer an error status."""


@dataclass(frozen=True)
class Message:
    """One whole ttrpc message from the peer on a mux connection."""

    conn: int
    stream: int
    type: int
    payload: bytes


@dataclass(frozen=True)
class Oversized:
    """A ttrpc message over MAX_MESSAGE; its bytes were skipped, its stream can still be answered."""

    conn: int
    stream: int
    type: int
    length: int


class _ConnBuffer:
    def __init__(self) -> None:
        self.data = bytearray()
        self.skip = 0


class Decoder:
    """Bytes off the socket -> whole ttrpc messages, per mux connection. Pure: no I/O."""

    def __init__(self) -> None:
        self._raw = bytearray()
        self._conns: dict[int, _ConnBuffer] = {PLUGIN_CONN: _ConnBuffer(), RUNTIME_CONN: _ConnBuffer()}

    @property
    def pending(self) -> int:
        """Bytes of frames or messages begun but not finished (what a close mid-frame cuts off)."""
        return len(self._raw) + sum(len(c.data) + c.skip for c in self._conns.values())

    def feed(self, data: bytes) -> Iterator[Message | Oversized]:
        self._raw += data
        while len(self._raw) >= MUX_HEADER.size:
            conn_id, length = MUX_HEADER.unpack_from(self._raw)
            if length > MAX_MUX_PAYLOAD:
                raise ProtocolError(
                    f"mux frame for connection {conn_id} claims {length} bytes (limit {MAX_MUX_PAYLOAD})"
                )
            if len(self._raw) < MUX_HEADER.size + length:
                return
            payload = bytes(self._raw[MUX_HEADER.size : MUX_HEADER.size + length])
            del self._raw[: MUX_HEADER.size + length]
            buffer = self._conns.get(conn_id)
            if buffer is None:
                LOG.warning("dropping a mux frame for an unknown connection", extra={"conn": conn_id, "bytes": length})
                continue
            yield from self._messages(conn_id, buffer, payload)

    @staticmethod
    def _messages(conn_id: int, buffer: _ConnBuffer, payload: bytes) -> Iterator[Message | Oversized]:
        if buffer.skip:
            dropped = min(buffer.skip, len(payload))
            buffer.skip -= dropped
            payload = payload[dropped:]
        buffer.data += payload
        while len(buffer.data) >= TTRPC_HEADER.size:
            length, stream, kind, _flags = TTRPC_HEADER.unpack_from(buffer.data)
            if length > MAX_MESSAGE:
                available = len(buffer.data) - TTRPC_HEADER.size
                buffer.skip = max(0, length - available)
                del buffer.data[: TTRPC_HEADER.size + min(length, available)]
                yield Oversized(conn_id, stream, kind, length)
                continue
            if len(buffer.data) < TTRPC_HEADER.size + length:
                return
            body = bytes(buffer.data[TTRPC_HEADER.size : TTRPC_HEADER.size + length])
            del buffer.data[: TTRPC_HEADER.size + length]
            yield Message(conn_id, stream, kind, body)


def encode(conn: int, stream: int, kind: int, body: bytes) -> bytes:
    """One ttrpc message as mux frames (split where the message is longer than a frame may be)."""
    message = TTRPC_HEADER.pack(len(body), stream, kind, 0) + body
    frames = bytearray()
    for start in range(0, len(message), MAX_MUX_PAYLOAD):
        chunk = message[start : start + MAX_MUX_PAYLOAD]
        frames += MUX_HEADER.pack(conn, len(chunk)) + chunk
    return bytes(frames)


def response_body(payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
    status = status_pb2.Status(code=code, message=message) if code else None
    return nri_ttrpc_pb2.Response(status=status, payload=payload).SerializeToString()


class Connection:
    """A connected NRI socket: serves `handler` for the runtime's calls and makes the plugin's own calls."""

    def __init__(self, sock: socket.socket, handler: Handler, *, name: str = "nri") -> None:
        self._sock = sock
        self._handler = handler
        self._name = name
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending: dict[int, Future[bytes]] = {}
        self._next_stream = 1
        self._closing = False
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)

    @classmethod
    def dial(cls, path: str, handler: Handler, *, timeout: float = 2.0) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(None)
        except OSError:
            sock.close()
            raise
        return cls(sock, handler, name=f"nri:{path}")

    def start(self) -> None:
        self._reader.start()

    # --- calls to the runtime ------------------------------------------------------------------------------

    def call(self, service: str, method: str, payload: bytes, timeout: float) -> bytes:
        future: Future[bytes] = Future()
        with self._state_lock:
            if self._closing or self.closed.is_set():
                raise ConnectionClosed(f"{self._name}: connection is closed; cannot call {method}")
            stream = self._next_stream
            self._next_stream += 2
            self._pending[stream] = future
        request = nri_ttrpc_pb2.Request(
            service=service, method=method, payload=payload, timeout_nano=int(timeout * 1e9)
        ).SerializeToString()
        try:
            self._send(encode(RUNTIME_CONN, stream, TYPE_REQUEST, request))
            return future.result(timeout)
        except FutureTimeout:
            raise TransportError(f"{self._name}: {service}/{method} got no answer in {timeout:.1f}s") from None
        finally:
            with self._state_lock:
                self._pending.pop(stream, None)

    def _send(self, data: bytes) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as err:
            self._shutdown(f"send failed: {err.strerror or err}")
            raise ConnectionClosed(f"{self._name}: send failed: {err.strerror or err}") from None

    # --- the reader ----------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = Decoder()
        reason = "closed by the runtime"
        try:
            while True:
                data = self._sock.recv(1 << 16)
                if not data:
                    if decoder.pending:
                        reason = f"closed by the runtime in the middle of a frame ({decoder.pending} bytes unread)"
                    break
                for item in decoder.feed(data):
                    self._dispatch(item)
        except ProtocolError as err:
            reason = str(err)
        except OSError as err:
            reason = "closed" if self._closing else f"receive failed: {err.strerror or err}"
        except ConnectionClosed as err:
            reason = str(err)
        self._shutdown(reason)

    def _dispatch(self, item: Message | Oversized) -> None:
        if isinstance(item, Oversized):
            LOG.error(
                "message over the size limit skipped",
                extra={"conn": item.conn, "stream": item.stream, "bytes": item.length, "limit": MAX_MESSAGE},
            )
            if item.conn == PLUGIN_CONN and item.type == TYPE_REQUEST:
                self._reply(item.stream, response_body(code=RESOURCE_EXHAUSTED, message="message too large"))
            elif item.conn == RUNTIME_CONN and item.type == TYPE_RESPONSE:
                self._complete(item.stream, error=TransportError(f"{self._name}: answer of {item.length} bytes"))
            return
        if item.conn == PLUGIN_CONN and item.type == TYPE_REQUEST:
            self._serve(item)
        elif item.conn == RUNTIME_CONN and item.type == TYPE_RESPONSE:
            self._answer(item)
        else:
            LOG.warning(
                "ignoring a message of unexpected type",
                extra={"conn": item.conn, "stream": item.stream, "type": item.type},
            )

    def _serve(self, item: Message) -> None:
        try:
            request = nri_ttrpc_pb2.Request.FromString(item.payload)
        except DecodeError:
            LOG.error("undecodable request envelope", extra={"stream": item.stream, "bytes": len(item.payload)})
            self._reply(item.stream, response_body(code=INVALID_ARGUMENT, message="undecodable ttrpc request"))
            return
        try:
            body = response_body(self._handler(request.service, request.method, request.payload))
        except MethodError as err:
            body = response_body(code=err.code, message=str(err))
        except DecodeError:
            LOG.error("undecodable request payload", extra={"method": request.method, "bytes": len(request.payload)})
            body = response_body(code=INVALID_ARGUMENT, message=f"undecodable {request.method} request")
        except Exception:
            # A bug in one handler must answer this call, not take the connection (and enforcement) down.
            LOG.exception("handler failed", extra={"service": request.service, "method": request.method})
            body = response_body(code=INTERNAL, message=f"{request.method} failed in the plugin")
        self._reply(item.stream, body)

    def _reply(self, stream: int, body: bytes) -> None:
        self._send(encode(PLUGIN_CONN, stream, TYPE_RESPONSE, body))

    def _answer(self, item: Message) -> None:
        try:
            response = nri_ttrpc_pb2.Response.FromString(item.payload)
        except DecodeError:
            self._complete(item.stream, error=TransportError(f"{self._name}: undecodable answer"))
            return
        if response.status.code:
            error = TransportError(f"{self._name}: runtime answered {response.status.code}: {response.status.message}")
            self._complete(item.stream, error=error)
        else:
            self._complete(item.stream, result=response.payload)

    def _complete(self, stream: int, *, result: bytes = b"", error: Exception | None = None) -> None:
        with self._state_lock:
            future = self._pending.pop(stream, None)
        if future is None:
            LOG.warning("answer for a call nobody waits for", extra={"stream": stream})
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # --- shutdown ------------------------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        with self._state_lock:
            if self.closed.is_set():
                return
            self.closed.set()
            pending, self._pending = self._pending, {}
            expected = self._closing
        (LOG.info if expected else LOG.warning)("NRI connection closed", extra={"reason": reason, "conn": self._name})
        for future in pending.values():
            future.set_exception(ConnectionClosed(f"{self._name}: {reason}"))
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop serving, fail pending calls, and wait for the reader (unless called from the reader)."""
        with self._state_lock:
            self._closing = True
        self._shutdown("closed")
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            self._reader.join()
        self._sock.close()
