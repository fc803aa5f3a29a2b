"""ClusterAPI over a real API server, with the official `kubernetes` client.

resource.k8s.io/v1 objects go through CustomObjectsApi as plain dicts, in the JSON shape the server stores: the
typed models would drop fields this client version does not know, which is exactly what the publisher must see.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from dra_cpu.errors import DraCpuError
from dra_cpu.kube.api import ClusterError, Conflict, NotFound
from dra_cpu.store.fileio import read_yaml

GROUP = "resource.k8s.io"
VERSION = "v1"
SLICES = "resourceslices"
CLAIMS = "resourceclaims"
# (connect, read) seconds for one request: a dead server must not hang the publisher or a prepare call.
REQUEST_TIMEOUT = (5.0, 30.0)
# The server ends a watch after this long and we resume from the last resourceVersion; bookmarks keep it fresh.
WATCH_SECONDS = 300
# How often a blocked watch checks whether it was asked to stop.
STOP_POLL_SECONDS = 0.1
WATCH_RETRY_SECONDS = (0.5, 30.0)

_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)


class KubeconfigError(DraCpuError):
    """The kubeconfig (or the in-cluster service account) cannot give a client configuration."""


@dataclass(frozen=True)
class DraObjects:
    """Every ResourceSlice, DeviceClass and ResourceClaim of a cluster (claims of all namespaces), as dicts with
    their kind: what `status` and `explain --kubeconfig` read."""

    slices: list[dict[str, Any]]
    classes: list[dict[str, Any]]
    claims: list[dict[str, Any]]


@dataclass(frozen=True)
class KubeAPI:
    api_client: client.ApiClient

    @property
    def server(self) -> str:
        return str(self.api_client.configuration.host)

    @property
    def _objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    def list_dra_objects(self) -> DraObjects:
        def items(plural: str, kind: str) -> list[dict[str, Any]]:
            what = f"listing {plural}"
            with self._errors(what):
                listed = _dict(
                    self._objects.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=REQUEST_TIMEOUT),
                    what,
                )
            # List items carry no kind of their own; explanations name objects by it.
            return [{"kind": kind, **item} for item in listed.get("items", []) if isinstance(item, dict)]

        return DraObjects(
            items(SLICES, "ResourceSlice"), items("deviceclasses", "DeviceClass"), items(CLAIMS, "ResourceClaim")
        )

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]

    def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        what = f"resourceclaim {namespace}/{name}"
        with self._errors(what):
            return _dict(
                self._objects.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, CLAIMS, name, _request_timeout=REQUEST_TIMEOUT
                ),
                what,
            )

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        what = f"pod {namespace}/{name}"
        with self._errors(what):
            # Unparsed, as for the node: the typed model would rename fields and drop those this client lacks.
            response: Any = client.CoreV1Api(self.api_client).read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        try:
            return _dict(json.loads(response.data), what)
        except ValueError:
            raise ClusterError(f"{what}: the API server answered something that is not JSON") from None

    def get_node(self, name: str) -> dict[str, Any] | None:
        try:
            # Unparsed, so that the dict has the server's field names like every other object here.
            response: Any = client.CoreV1Api(self.api_client).read_node(
                name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
            node = json.loads(response.data)
        except (ApiException, ValueError, *_TRANSPORT_ERRORS):
            # Owner references are a nicety (garbage collection with the Node): publish without them.
            return None
        return node if isinstance(node, dict) else None

    def list_slices(self, driver: str, node: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._list_slices(driver, node)["items"]
        return items

    def _list_slices(self, driver: str, node: str) -> dict[str, Any]:
        what = f"resourceslices of driver {driver} on node {node}"
        with self._errors(what):
            return _dict(
                self._objects.list_cluster_custom_object(
                    GROUP, VERSION, SLICES, field_selector=_selector(driver, node), _request_timeout=REQUEST_TIMEOUT
                ),
                what,
            )

    def create_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        what = f"resourceslice {obj['metadata']['name']}"
        with self._errors(what):
            return _dict(
                self._objects.create_cluster_custom_object(
                    GROUP, VERSION, SLICES, obj, _request_timeout=REQUEST_TIMEOUT
                ),
                what,
            )

    def update_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        with self._errors(f"resourceslice {name}"):
            return _dict(
                self._objects.replace_cluster_custom_object(
                    GROUP, VERSION, SLICES, name, obj, _request_timeout=REQUEST_TIMEOUT
                ),
                f"resourceslice {name}",
            )

    def delete_slice(self, name: str) -> None:
        """Deleting a slice that is already gone succeeds: the outcome is the same."""
        try:
            with self._errors(f"resourceslice {name}"):
                # Some servers answer DELETE with a Status the client cannot parse into an object: do not parse.
                self._objects.delete_cluster_custom_object(
                    GROUP, VERSION, SLICES, name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
        except NotFound:
            pass

    def watch_slices(self, driver: str, node: str, stop: threading.Event) -> Iterator[None]:
        """Yields after every change to the node's slices, and once after each (re)list, since changes made while
        not watching are unseen. Resumes after the server ends a watch, relists when the version expired, and
        retries with capped backoff while the server is unreachable; returns soon after `stop` is set."""
        resource_version: str | None = None
        delay = WATCH_RETRY_SECONDS[0]
        while not stop.is_set():
            try:
                if resource_version is None:
                    resource_version = str(self._list_slices(driver, node)["metadata"]["resourceVersion"])
                    yield None
                for version, changed in self._watch(driver, node, resource_version, stop):
                    resource_version, delay = version, WATCH_RETRY_SECONDS[0]
                    if changed:
                        yield None
            except (ApiException, ClusterError, *_TRANSPORT_ERRORS) as err:
                resource_version = None
                if isinstance(err, ApiException) and err.status == 410:
                    continue  # Gone: too old to resume from; list again at once
                stop.wait(delay)
                delay = min(delay * 2, WATCH_RETRY_SECONDS[1])

    def _watch(
        self, driver: str, node: str, resource_version: str, stop: threading.Event
    ) -> Iterator[tuple[str, bool]]:
        """One watch request: yields each event's resourceVersion and whether it was a change (not a bookmark)."""
        w = watch.Watch()  # type: ignore[no-untyped-call]
        done = threading.Event()
        # The stream blocks in a socket read; a helper shuts the socket down when asked to stop.
        waker = threading.Thread(target=_stop_when, args=(stop, done, w), name="slice-watch-stop", daemon=True)
        waker.start()
        try:
            for event in w.stream(  # type: ignore[no-untyped-call]
                self._objects.list_cluster_custom_object,
                GROUP,
                VERSION,
                SLICES,
                field_selector=_selector(driver, node),
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + REQUEST_TIMEOUT[1]),
            ):
                yield str(event["raw_object"]["metadata"]["resourceVersion"]), event["type"] != "BOOKMARK"
        finally:
            done.set()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turns the client's exceptions into ClusterError, NotFound and Conflict naming the object."""
        try:
            yield
        except ApiException as err:
            raise _api_error(what, err) from None
        except _TRANSPORT_ERRORS as err:
            raise ClusterError(f"{what}: cannot reach the API server at {self.server}: {_reason(err)}") from None


def _stop_when(stop: threading.Event, done: threading.Event, w: watch.Watch) -> None:
    while not done.is_set():
        if stop.wait(STOP_POLL_SECONDS):
            w.stop()  # type: ignore[no-untyped-call]
            return


def _selector(driver: str, node: str) -> str:
    return f"spec.nodeName={node},spec.driver={driver}"


def _dict(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ClusterError(f"{what}: the API server answered {type(obj).__name__}, not an object")
    return obj


def _api_error(what: str, err: ApiException) -> ClusterError:
    message = err.reason
    try:
        body = json.loads(err.body) if err.body else {}
        message = body.get("message") or message
    except (ValueError, AttributeError):
        pass
    text = f"{what}: {err.status} {message}"
    if err.status == 404:
        return NotFound(text)
    if err.status == 409:
        return Conflict(text)
    return ClusterError(text)


def _reason(err: BaseException) -> str:
    """The innermost cause of a transport error in one line, without urllib3's object reprs."""
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        err = err.reason
    text = str(err)
    # "HTTPSConnection(host=..., port=...): Failed to establish a new connection: [Errno 111] Connection refused"
    return " ".join(text.split(": ", 1)[-1].split()) if "): " in text else " ".join(text.split())


def connect(kubeconfig: str | None) -> KubeAPI:
    """A KubeAPI from a kubeconfig file, or from the pod's service account when `kubeconfig` is None. Checks once
    that the server answers and serves resource.k8s.io/v1 ResourceSlices, so that a wrong setting fails at start."""
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException as err:
            raise KubeconfigError(f"no --kubeconfig given and no in-cluster service account: {err}") from None
    else:
        _load_kubeconfig(Path(kubeconfig), configuration)
    api = KubeAPI(client.ApiClient(configuration))
    # The client imports an API's module at first use; get_node's, the largest, is imported now, while the daemon
    # starts, so that its objects are among those the daemon takes out of garbage collection (daemon.py).
    importlib.import_module("kubernetes.client.api.core_v1_api")
    try:
        api._objects.list_cluster_custom_object(GROUP, VERSION, SLICES, limit=1, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as err:
        api.api_client.close()  # type: ignore[no-untyped-call]
        hint = {
            401: "the credentials were rejected",
            403: "not allowed to list resourceslices (check the RBAC rules of the driver)",
            404: "resource.k8s.io/v1 resourceslices are not served (Kubernetes 1.34 or later is needed)",
        }.get(err.status, f"{err.status} {err.reason}")
        raise ClusterError(f"API server {api.server}: {hint}") from None
    except _TRANSPORT_ERRORS as err:
        api.api_client.close()  # type: ignore[no-untyped-call]
        raise ClusterError(f"cannot reach the API server at {api.server}: {_reason(err)}") from None
    return api


def _load_kubeconfig(path: Path, configuration: client.Configuration) -> None:
    content = next(iter(read_yaml(path, "kubeconfig", KubeconfigError)), None)
    if not isinstance(content, dict):
        raise KubeconfigError(f"kubeconfig {path} does not hold a kubeconfig (a YAML mapping)")
    try:
        config.load_kube_config(config_file=str(path), client_configuration=configuration)  # type: ignore[no-untyped-call]
    except (config.ConfigException, ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        raise KubeconfigError(f"kubeconfig {path}: {' '.join(str(err).split())}") from None
