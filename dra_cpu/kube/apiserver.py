"""ClusterAPI over a real API server (kube/rest.py's client).

Objects are plain dicts in the JSON shape the server stores: a typed model would drop fields the client does not
know, which is exactly what the publisher must see. The pods that reserve a claim come from a cache of this node's
pods (kube/pods.py) when the daemon connects with its node name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dra_cpu.kube.api import ClusterError, Conflict, NotFound
from dra_cpu.kube.kubeconfig import KubeconfigError, from_kubeconfig, in_cluster
from dra_cpu.kube.pods import PodCache
from dra_cpu.kube.rest import TRANSPORT_ERRORS, ApiError, Changed, Listed, RestClient, Watch, segment

__all__ = ["ClusterError", "DraObjects", "KubeAPI", "KubeconfigError", "connect"]

GROUP = "resource.k8s.io"
VERSION = "v1"
SLICES = "resourceslices"
CLAIMS = "resourceclaims"
_RESOURCE = f"/apis/{GROUP}/{VERSION}"


@dataclass(frozen=True)
class DraObjects:
    """Every ResourceSlice, DeviceClass and ResourceClaim of a cluster (claims of all namespaces), as dicts with
    their kind: what `status` and `explain --kubeconfig` read."""

    slices: list[dict[str, Any]]
    classes: list[dict[str, Any]]
    claims: list[dict[str, Any]]


@dataclass(frozen=True)
class KubeAPI:
    rest: RestClient
    # This node's pods, when connected with a node name: prepares read the pods that reserve a claim from it.
    pods: PodCache | None = None

    @property
    def server(self) -> str:
        return self.rest.server

    def list_dra_objects(self) -> DraObjects:
        def items(plural: str, kind: str) -> list[dict[str, Any]]:
            listed = self._request(f"listing {plural}", "GET", f"{_RESOURCE}/{plural}")
            # List items carry no kind of their own; explanations name objects by it.
            return [{"kind": kind, **item} for item in listed.get("items") or [] if isinstance(item, dict)]

        return DraObjects(
            items(SLICES, "ResourceSlice"), items("deviceclasses", "DeviceClass"), items(CLAIMS, "ResourceClaim")
        )

    def close(self) -> None:
        if self.pods is not None:
            self.pods.close()
        self.rest.close()

    def on_pod_end(self, callback: Callable[[str], None]) -> None:
        if self.pods is not None:
            self.pods.on_end(callback)

    def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        return self._request(
            f"resourceclaim {namespace}/{name}",
            "GET",
            f"{_RESOURCE}/namespaces/{segment(namespace)}/{CLAIMS}/{segment(name)}",
        )

    def get_pod(self, namespace: str, name: str, uid: str = "") -> dict[str, Any]:
        if uid and self.pods is not None:
            cached = self.pods.get(namespace, name, uid)
            if cached is not None:
                return cached
        return self._request(
            f"pod {namespace}/{name}", "GET", f"/api/v1/namespaces/{segment(namespace)}/pods/{segment(name)}"
        )

    def get_node(self, name: str) -> dict[str, Any] | None:
        try:
            return self._request(f"node {name}", "GET", f"/api/v1/nodes/{segment(name)}")
        except ClusterError:
            # Owner references are a nicety (garbage collection with the Node): publish without them.
            return None

    def list_slices(self, driver: str, node: str) -> list[dict[str, Any]]:
        listed = self._request(
            f"resourceslices of driver {driver} on node {node}",
            "GET",
            f"{_RESOURCE}/{SLICES}",
            {"fieldSelector": _selector(driver, node)},
        )
        return [item for item in listed.get("items") or [] if isinstance(item, dict)]

    def create_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._request(f"resourceslice {obj['metadata']['name']}", "POST", f"{_RESOURCE}/{SLICES}", body=obj)

    def update_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        slice_name = obj["metadata"]["name"]
        return self._request(
            f"resourceslice {slice_name}", "PUT", f"{_RESOURCE}/{SLICES}/{segment(slice_name)}", body=obj
        )

    def delete_slice(self, name: str) -> None:
        """Deleting a slice that is already gone succeeds: the outcome is the same."""
        with suppress(NotFound):
            self._call(f"resourceslice {name}", "DELETE", f"{_RESOURCE}/{SLICES}/{segment(name)}")

    def watch_slices(self, driver: str, node: str, stop: threading.Event) -> Iterator[None]:
        """Yields after every change to the node's slices, and once after each (re)list, since changes made while
        not watching are unseen. Resumes after the server ends a watch, relists when the version expired, and
        retries with capped backoff while the server is unreachable; returns soon after `stop` is set."""
        watch = Watch(self.rest, f"{_RESOURCE}/{SLICES}", _selector(driver, node))
        watch.close_when(stop, "slice-watch-stop")
        for update in watch:
            if isinstance(update, Listed | Changed):
                yield None

    def _request(
        self, what: str, method: str, path: str, query: dict[str, str | int] | None = None, body: object = None
    ) -> dict[str, Any]:
        answer = self._call(what, method, path, query, body)
        if not isinstance(answer, dict):
            raise ClusterError(f"{what}: the API server answered {type(answer).__name__}, not an object")
        return answer

    def _call(
        self, what: str, method: str, path: str, query: dict[str, str | int] | None = None, body: object = None
    ) -> object:
        with self._errors(what):
            return self.rest.request(method, path, query, body)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turns the client's exceptions into ClusterError, NotFound and Conflict naming the object."""
        try:
            yield
        except ApiError as err:
            raise _api_error(what, err) from None
        except ValueError:
            raise ClusterError(f"{what}: the API server answered something that is not JSON") from None
        except TRANSPORT_ERRORS as err:
            raise ClusterError(f"{what}: cannot reach the API server at {self.server}: {_reason(err)}") from None


def _selector(driver: str, node: str) -> str:
    return f"spec.nodeName={node},spec.driver={driver}"


def _api_error(what: str, err: ApiError) -> ClusterError:
    text = f"{what}: {err.status} {err.message}"
    if err.status == 404:
        return NotFound(text)
    if err.status == 409:
        return Conflict(text)
    return ClusterError(text)


def _reason(err: BaseException) -> str:
    """A transport error in one line."""
    return " ".join(str(err).split()) or type(err).__name__


def connect(kubeconfig: str | None, node_name: str = "") -> KubeAPI:
    """A KubeAPI from a kubeconfig file, or from the pod's service account when `kubeconfig` is None. Checks once
    that the server answers and serves resource.k8s.io/v1 ResourceSlices, so that a wrong setting fails at start.
    With `node_name`, the pods of that node are watched from now on (kube/pods.py)."""
    endpoint = in_cluster() if kubeconfig is None else from_kubeconfig(Path(kubeconfig))
    rest = RestClient(endpoint)
    try:
        rest.request("GET", f"{_RESOURCE}/{SLICES}", {"limit": 1})
    except ApiError as err:
        rest.close()
        hint = {
            401: "the credentials were rejected",
            403: "not allowed to list resourceslices (check the RBAC rules of the driver)",
            404: "resource.k8s.io/v1 resourceslices are not served (Kubernetes 1.34 or later is needed)",
        }.get(err.status, f"{err.status} {err.reason}")
        raise ClusterError(f"API server {rest.server}: {hint}") from None
    except (ValueError, *TRANSPORT_ERRORS) as err:
        rest.close()
        raise ClusterError(f"cannot reach the API server at {rest.server}: {_reason(err)}") from None
    pods = PodCache(rest, node_name) if node_name else None
    if pods is not None:
        pods.start()
    return KubeAPI(rest, pods)
