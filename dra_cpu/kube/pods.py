"""This node's pods that use resource claims, kept by one list-and-watch of the node's pods (fieldSelector
spec.nodeName=<node>, as the kubelet watches its own), so that a prepare reads the pods reserving its claim
without a request of its own.

Why a cached pod is as good as a GET for the CFS check (core/cpu_quota.py): a pod enters this watch when it is
bound to the node, and the bound pod already has all the check reads. Its containers' limits and resource claims
are immutable (an in-place resize aside, which a prepare-time check cannot follow anyway);
status.resourceClaimStatuses is written before the pod can be scheduled, and the scheduler patches
status.nodeAllocatableResourceClaimStatuses in PreBind, before the binding. A pod the cache has not seen yet (this
watch lags the kubelet's), or has under another uid (deleted and created again under the same name), is read with
one GET instead, as before there was a cache.

The watch also tells hand-over (handover.py) when a pod that uses a claim ends, so that the claim can go to a pod
waiting for it without waiting for that pod's next refused container first. A pod that ends while the watch is
down is not told (a relist replaces the cache whole): hand-over then learns of it from the next refusal.

Only pods with spec.resourceClaims are kept (no other pod can reserve a claim), without metadata.managedFields, so
that a node full of ordinary pods costs next to no memory. The cached dicts are shared, never changed: callers
must not change them either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from dra_cpu.kube.rest import Changed, Failed, Listed, RestClient, Watch

LOG = logging.getLogger("dra_cpu.kube")
# The phases of a pod whose containers have all ended for good (the claim controller then drops it from
# reservedFor).
ENDED_PHASES = ("Succeeded", "Failed")


def _kept(pod: dict[str, Any]) -> dict[str, Any] | None:
    spec, metadata = pod.get("spec"), pod.get("metadata")
    if not isinstance(spec, dict) or not spec.get("resourceClaims") or not isinstance(metadata, dict):
        return None
    if not isinstance(metadata.get("uid"), str):
        return None
    if "managedFields" in metadata:
        pod = {**pod, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}
    return pod


class PodCache:
    """uid -> pod, for the pods of one node that use resource claims; `start()` runs the watch in a thread."""

    def __init__(self, rest: RestClient, node: str) -> None:
        self.node = node
        self._watch = Watch(rest, "/api/v1/pods", f"spec.nodeName={node}")
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, Any]] = {}
        self._hits = 0
        self._misses = 0
        self.listed = threading.Event()
        """Set once the first list arrived: from then on the cache knows every pod bound before that list."""
        self._on_end: Callable[[str], None] | None = None

    def on_end(self, callback: Callable[[str], None]) -> None:
        """`callback` gets the uid of each kept pod that ends or is deleted from now on, on the watch's thread."""
        with self._lock:
            self._on_end = callback

    def start(self) -> None:
        threading.Thread(target=self.run, name="pod-watch", daemon=True).start()

    def close(self) -> None:
        self._watch.close()

    @property
    def counts(self) -> tuple[int, int]:
        """Lookups answered from the cache, and those that needed a GET."""
        with self._lock:
            return self._hits, self._misses

    def get(self, namespace: str, name: str, uid: str) -> dict[str, Any] | None:
        """The pod of that uid (and name), or None when the cache does not have it: then read it from the server."""
        with self._lock:
            pod = self._pods.get(uid)
            metadata = pod.get("metadata", {}) if pod is not None else {}
            if pod is None or metadata.get("namespace") != namespace or metadata.get("name") != name:
                self._misses += 1
                return None
            self._hits += 1
            return pod

    def run(self) -> None:
        """Applies the watch until close(); failures are logged and retried (lookups fall back to GETs)."""
        for update in self._watch:
            if isinstance(update, Failed):
                LOG.warning(
                    "watching this node's pods failed; prepares read pods from the API server meanwhile",
                    extra={"node": self.node, "error": str(update.error), "retryInSeconds": update.retry_in},
                )
                continue
            ended = None
            with self._lock:
                if isinstance(update, Listed):
                    kept = (_kept(pod) for pod in update.items)
                    self._pods = {pod["metadata"]["uid"]: pod for pod in kept if pod is not None}
                else:
                    ended = self._apply(update)
                on_end = self._on_end
            if isinstance(update, Listed):
                self.listed.set()
            if ended is not None and on_end is not None:
                on_end(ended)

    def _apply(self, change: Changed) -> str | None:
        """The change applied; the pod's uid when it means that a kept pod ended (deleted, or now in an ended
        phase), else None."""
        uid = change.object.get("metadata", {}).get("uid")
        if change.type == "DELETED" or not isinstance(uid, str):
            gone = self._pods.pop(str(uid), None)
            return str(uid) if gone is not None and not _ended(gone) else None
        pod = _kept(change.object)
        if pod is None:
            return None
        before = self._pods.get(uid)
        self._pods[uid] = pod
        return uid if _ended(pod) and (before is None or not _ended(before)) else None


def _ended(pod: dict[str, Any]) -> bool:
    status = pod.get("status")
    return isinstance(status, dict) and status.get("phase") in ENDED_PHASES
