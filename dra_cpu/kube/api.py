"""ClusterAPI: everything dra-cpu asks of the cluster, so that the driver runs the same code with or without one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from dra_cpu.errors import DraCpuError


class ClusterError(DraCpuError):
    """The cluster could not answer; transient unless the message says otherwise."""


class NotFound(ClusterError):
    pass


class Conflict(ClusterError):
    """Someone else changed the object since we read it: re-read and try again."""


class ClusterAPI(Protocol):
    def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        """The ResourceClaim as the API server returns it; NotFound when it does not exist."""
        ...

    def get_pod(self, namespace: str, name: str, uid: str = "") -> dict[str, Any]:
        """The Pod as the API server returns it; NotFound when it does not exist. With the `uid` the caller wants,
        a copy of that pod the client already holds (a watch of the node's pods) may answer instead of a request;
        the caller still compares the uid, since the server may hold another pod under the name."""
        ...

    def get_node(self, name: str) -> dict[str, Any] | None:
        """The Node, or None when it cannot be read (no such node, no permission, a stand-in server)."""
        ...

    def on_pod_end(self, callback: Callable[[str], None]) -> None:
        """From now on, `callback` gets the uid of each of this node's pods using a resource claim when it ends
        (Succeeded or Failed) or is deleted, from a thread of the client's; never where nothing watches the node's
        pods (a stand-in cluster)."""
        ...

    def list_slices(self, driver: str, node: str) -> list[dict[str, Any]]: ...

    def create_slice(self, obj: dict[str, Any]) -> dict[str, Any]: ...

    def update_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace a slice; `metadata.resourceVersion` guards against lost updates (Conflict)."""
        ...

    def delete_slice(self, name: str) -> None: ...

    def watch_slices(self, driver: str, node: str, stop: threading.Event) -> Iterator[None]:
        """Yields after every change to the node's slices by anyone, until `stop` is set."""
        ...
