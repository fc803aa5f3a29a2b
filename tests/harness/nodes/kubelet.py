"""What every node with a real kubelet joined to the control plane shares (the real node on this machine,
tests/harness/nodes/real.py, and the guest's, tests/harness/nodes/guest_kubelet.py): the kubelet's credentials,
configuration and command line, waiting for the Node to be Ready, and leaving the cluster clean.

No node lifecycle controller runs in the harness's control plane, so each node does its part: it takes the not-ready
taint off once the Node is Ready, and deletes its Node when it stops (the garbage collector then deletes its
ResourceSlices, and the scheduler no longer places pods on a node that is gone).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.harness.cluster.client import Kube, close_api_client
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.component import Component
from tests.harness.poll import NotYet, WaitTimeout, wait_until

START_SECONDS = 180.0
"""For a kubelet to register its Node and get it Ready."""
DRAIN_SECONDS = 90.0


class NodeError(Exception):
    """A node did not start or get Ready; the message carries the kubelet's (and the driver's) log tails."""


class KubeletNode(Component, ABC):
    """A node whose kubelet is joined to `plane` as Node `name`. Subclasses start and stop the kubelet and what it
    runs on; this class gives them the admin client, the wait for Ready and the way out of the cluster."""

    plane: ControlPlane
    name: str
    drain_seconds: float = DRAIN_SECONDS
    """How long `stop()` waits for the node's pods to go."""
    _api: client.ApiClient | None = None

    @property
    def kube(self) -> Kube:
        """The control plane as its admin (one connection for the node's life)."""
        if self._api is None:
            self._api = self.plane.admin()
        return Kube(self._api)

    @abstractmethod
    def kubelet_exited(self) -> str:
        """Why the kubelet is not running (it exited, with what), or "" while it runs."""

    @abstractmethod
    def kubelet_log_tail(self, lines: int = 40) -> str: ...

    @abstractmethod
    def plugin_watcher_ready(self) -> bool:
        """Whether the kubelet's plugins_registry folder is there (a plugin registers in it; a DaemonSet mounts it)."""

    @abstractmethod
    def stop_parts(self) -> None:
        """Stops the driver (where the node runs one itself), the kubelet and the runtime, and removes their files."""

    def describe(self) -> str:
        """What failure messages show of the node: the kubelet's log tail (subclasses add the driver's)."""
        return f"kubelet of {self.name}:\n{self.kubelet_log_tail()}"

    def wait_ready(self, timeout: float = START_SECONDS) -> dict[str, Any]:
        """The Node once Ready, with the not-ready taint taken off; NodeError with the kubelet's log otherwise."""

        def ready() -> dict[str, Any] | NotYet:
            node = self.kube.find(f"/api/v1/nodes/{self.name}")
            conditions = (node or {}).get("status", {}).get("conditions", [])
            if node is None or not _ready(conditions) or not self.plugin_watcher_ready():
                return NotYet(conditions)
            taints = node["spec"].get("taints") or []
            kept = [t for t in taints if not t["key"].startswith("node.kubernetes.io/not-ready")]
            return (
                node
                if kept == taints
                else self.kube.patch(f"/api/v1/nodes/{self.name}", {"spec": {"taints": kept or None}})
            )

        return wait_until(
            ready,
            f"node {self.name} to be Ready",
            timeout,
            0.5,
            abort=self.kubelet_exited,
            details=self.describe,
            error=NodeError,
        )

    def stop(self) -> None:
        """Deletes the node's pods (so that the kubelet unmounts their volumes and unprepares their claims), stops
        its parts, and deletes its Node."""
        try:
            if self._api is not None and not self.kubelet_exited():
                self.drain(self.drain_seconds)
        finally:
            try:
                self.stop_parts()
            finally:
                if self._api is not None:
                    with contextlib.suppress(Exception):
                        self.kube.delete(f"/api/v1/nodes/{self.name}")
                    close_api_client(self._api)
                    self._api = None

    def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Deletes the node's pods and waits for those no DaemonSet brings back (uninstall DaemonSets first)."""
        kube = self.kube

        def pods() -> list[dict[str, Any]]:
            return kube.list("/api/v1/pods", field_selector=f"spec.nodeName={self.name}")

        for pod in pods():
            meta = pod["metadata"]
            kube.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
        with contextlib.suppress(WaitTimeout):
            wait_until(
                lambda: not [p for p in pods() if not _owned_by_daemonset(p)],
                f"the pods of node {self.name} to be gone",
                timeout,
                0.5,
            )


def _ready(conditions: list[dict[str, Any]]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _owned_by_daemonset(pod: Mapping[str, Any]) -> bool:
    return any(o.get("kind") == "DaemonSet" for o in pod["metadata"].get("ownerReferences", []))


def kubelet_gates(plane: ControlPlane, feature_gates: Mapping[str, bool] | None = None) -> dict[str, bool]:
    """`feature_gates` (by default the control plane's) less those this kubelet does not know."""
    known = plane.known_gates("kubelet")
    return {k: v for k, v in (feature_gates or plane.gates).items() if k in known}


def kubelet_configuration(
    plane: ControlPlane,
    *,
    port: int,
    cri_socket: str,
    cgroup_root: str,
    pod_logs_dir: str,
    feature_gates: Mapping[str, bool],
) -> dict[str, Any]:
    """The KubeletConfiguration of a test node: the cgroupfs driver below containerd's cgroup parent, no CPU manager,
    client certificates of the plane's CA only, and nothing that evicts the tests' pods or deletes their images."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "containerRuntimeEndpoint": f"unix://{cri_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "failCgroupV1": False,
        "failSwapOn": False,
        "oomScoreAdj": 0,
        "cpuManagerPolicy": "none",
        "podLogsDir": pod_logs_dir,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(plane.pki.ca)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        # A busy shared disk must not make the node evict the tests' pods or delete their images.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "featureGates": dict(feature_gates),
        "serializeImagePulls": False,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "fileCheckFrequency": "5s",
    }


def kubelet_argv(binary: Path, config_dir: Path, root: Path, name: str) -> list[str]:
    """The kubelet's command line: kubelet.yaml and kubelet.kubeconfig in `config_dir`, its own serving certificate
    in config_dir/pki, root folder `root`, node `name`."""
    return [
        str(binary),
        f"--config={config_dir / 'kubelet.yaml'}",
        f"--kubeconfig={config_dir / 'kubelet.kubeconfig'}",
        f"--root-dir={root}",
        f"--cert-dir={config_dir / 'pki'}",
        f"--hostname-override={name}",
        "--v=2",
    ]


def container_id(pod: Mapping[str, Any], name: str | None = None) -> str:
    """The runtime id of a pod's container (the first, or the one named `name`)."""
    for status in pod.get("status", {}).get("containerStatuses", []):
        if name is None or status["name"] == name:
            return str(status["containerID"]).split("://", 1)[1]
    raise AssertionError(f"pod {pod['metadata']['name']} has no container {name or ''} status")
