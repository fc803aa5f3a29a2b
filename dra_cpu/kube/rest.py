"""A small client of the Kubernetes REST API over the standard library: JSON objects in and out as dicts, a few
kept-alive connections, and list-then-watch of a collection.

The daemon reads and writes a handful of resources as plain dicts (the server's JSON shape is what the publisher
must compare); the `kubernetes` package's typed models, its generated API classes and their imports cost some
25 MiB of memory and a third of a second of CPU at every start for nothing it uses (docs/benchmarks.md).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from dra_cpu.kube.kubeconfig import Endpoint

# (connect, read) seconds for one request: a dead server must not hang the publisher or a prepare call.
REQUEST_TIMEOUT = (5.0, 30.0)
# The server ends a watch after this long and it is resumed from the last resourceVersion; bookmarks keep it fresh.
WATCH_SECONDS = 300
WATCH_RETRY_SECONDS = (0.5, 30.0)
# Idle connections kept for reuse; more may be open at once (concurrent prepares), and are closed after use.
IDLE_CONNECTIONS = 4
USER_AGENT = "dra-cpu"

TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
"""What a request raises when the server cannot be reached or breaks the connection (ssl errors are OSErrors)."""

_STALE = (ConnectionError, http.client.BadStatusLine, ssl.SSLEOFError, ssl.SSLZeroReturnError)
"""What a kept-alive connection the server closed meanwhile raises on its next use."""


class ApiError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, reason: str, body: bytes | Mapping[str, Any]) -> None:
        self.status, self.reason = status, reason
        self.message = _status_message(body) or reason
        super().__init__(f"{status} {self.message}")


def _status_message(body: bytes | Mapping[str, Any]) -> str:
    """The `message` of the metav1.Status the server sends with an error, when it sent one."""
    if not isinstance(body, Mapping):
        try:
            body = json.loads(body)
        except ValueError:
            return ""
    message = body.get("message") if isinstance(body, Mapping) else None
    return message if isinstance(message, str) else ""


class _HTTPSConnection(http.client.HTTPSConnection):
    """Verifies the server's certificate for `server_name` (kubeconfig tls-server-name) rather than the host."""

    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext, server_name: str) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP (no delay), and the proxy's tunnel if any
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)  # type: ignore[attr-defined]


class RestClient:
    """Requests to one API server; thread-safe."""

    def __init__(self, endpoint: Endpoint, idle_connections: int = IDLE_CONNECTIONS) -> None:
        self.endpoint = endpoint
        self._idle: list[http.client.HTTPConnection] = []
        self._max_idle = idle_connections
        self._lock = threading.Lock()

    @property
    def server(self) -> str:
        return self.endpoint.server

    def _connect(self, read_timeout: float) -> http.client.HTTPConnection:
        e = self.endpoint
        host, port = e.proxy or (e.host, e.port)
        connection: http.client.HTTPConnection
        if e.tls is not None:
            connection = _HTTPSConnection(host, port, REQUEST_TIMEOUT[0], e.tls, e.tls_server_name or e.host)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT[0])
        if e.proxy is not None:
            connection.set_tunnel(e.host, e.port)
        try:
            connection.connect()
            assert connection.sock is not None
            connection.sock.settimeout(read_timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection the server has not closed, or a new one; and whether it was reused."""
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._connect(REQUEST_TIMEOUT[1]), False
            # An idle connection that is readable was closed by the server (or sent garbage): not usable.
            if connection.sock is not None and not select.select([connection.sock], [], [], 0)[0]:
                return connection, True
            connection.close()

    def _give(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        authorization = self.endpoint.authorization()
        if authorization:
            headers["Authorization"] = authorization
        return headers

    def request(self, method: str, path: str, query: Mapping[str, str | int] | None = None, body: object = None) -> Any:
        """The decoded JSON answer (None when empty); ApiError for an error status, TRANSPORT_ERRORS otherwise."""
        url = _url(path, query)
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        headers = self._headers(data)
        for attempt in range(2):
            connection, reused = self._take()
            try:
                connection.request(method, url, body=data, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except _STALE:
                connection.close()
                # Closed by the server between our check and the request: it has not seen the request, try anew.
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                self._give(connection)
            if response.status >= 400:
                raise ApiError(response.status, response.reason, payload)
            return json.loads(payload) if payload else None
        raise AssertionError("unreachable")

    def stream(self, path: str, query: Mapping[str, str | int], read_timeout: float) -> Stream:
        """A GET whose answer is read as it comes (a watch), on a connection of its own."""
        connection = self._connect(read_timeout)
        try:
            connection.request("GET", _url(path, query), headers=self._headers(None))
            response = connection.getresponse()
            if response.status >= 400:
                raise ApiError(response.status, response.reason, response.read())
        except BaseException:
            connection.close()
            raise
        return Stream(connection, response)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class Stream:
    """An answer read line by line (watch events are one JSON object a line); close() may come from another thread
    and ends a read that is blocked waiting for the server."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._connection = connection
        self._response = response
        self._closed = threading.Event()

    def lines(self) -> Iterator[bytes]:
        pending = b""
        try:
            while chunk := self._response.read1(65536):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                yield from (line for line in complete if line.strip())
        except TRANSPORT_ERRORS:
            if not self._closed.is_set():
                raise
        finally:
            self._connection.close()

    def close(self) -> None:
        self._closed.set()
        sock = self._connection.sock
        if sock is not None:
            # The plain socket's shutdown, also under TLS: it wakes the reader without touching the TLS state the
            # reading thread is using. OSError: not connected (any more).
            with suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclass(frozen=True)
class Listed:
    """The whole collection, as of `resource_version`: what a watcher holds is replaced by it."""

    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class Changed:
    """One watch event: ADDED, MODIFIED or DELETED, and the object as it is (or was, for DELETED) then."""

    type: str
    object: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """Listing or watching failed; the next attempt comes after `retry_in` seconds (a relist)."""

    error: Exception
    retry_in: float


class Watch:
    """List, then watch from the list's resourceVersion, for as long as it is iterated: resumes after the server
    ends a watch, lists again when the version expired (410 Gone) and, after a failure, with capped exponential
    backoff. The iteration ends soon after close(), which any thread may call."""

    def __init__(self, rest: RestClient, path: str, field_selector: str) -> None:
        self._rest = rest
        self._path = path
        self._selector = field_selector
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: Stream | None = None

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()

    def close_when(self, stop: threading.Event, name: str) -> None:
        """close() once `stop` is set, from a thread that costs nothing while it waits."""

        def wait() -> None:
            stop.wait()
            self.close()

        threading.Thread(target=wait, name=name, daemon=True).start()

    def __iter__(self) -> Iterator[Listed | Changed | Failed]:
        version: str | None = None
        delay = WATCH_RETRY_SECONDS[0]
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self._rest.request("GET", self._path, {"fieldSelector": self._selector})
                    version = str(listed["metadata"]["resourceVersion"])
                    yield Listed([i for i in listed.get("items") or [] if isinstance(i, dict)], version)
                for event_type, obj in self._events(version):
                    version, delay = str(obj["metadata"]["resourceVersion"]), WATCH_RETRY_SECONDS[0]
                    if event_type != "BOOKMARK":
                        yield Changed(event_type, obj)
            except (ApiError, ValueError, KeyError, TypeError, *TRANSPORT_ERRORS) as err:
                if self._stop.is_set():
                    return
                version = None
                if isinstance(err, ApiError) and err.status == 410:
                    continue  # too old to resume from: list again at once
                yield Failed(err, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, WATCH_RETRY_SECONDS[1])

    def _events(self, version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """One watch request: (type, object) of each event, until the server ends it or close() is called."""
        query: dict[str, str | int] = {
            "watch": "true",
            "fieldSelector": self._selector,
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": WATCH_SECONDS,
        }
        stream = self._rest.stream(self._path, query, read_timeout=WATCH_SECONDS + REQUEST_TIMEOUT[1])
        with self._lock:
            self._stream = stream
        if self._stop.is_set():  # closed while the request was being made
            stream.close()
        try:
            for line in stream.lines():
                event = json.loads(line)
                event_type, obj = event["type"], event["object"]
                if event_type == "ERROR":
                    raise ApiError(int(obj.get("code") or 500), str(obj.get("reason") or "watch error"), obj)
                yield event_type, obj
        finally:
            with self._lock:
                self._stream = None


def _url(path: str, query: Mapping[str, str | int] | None) -> str:
    return f"{path}?{urlencode(query)}" if query else path


def segment(value: str) -> str:
    """An object name or namespace made safe for a URL path (names are DNS labels; this is for the odd one)."""
    return quote(value, safe="")
