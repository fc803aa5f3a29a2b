"""What every node with a real kubelet joined to the control plane shares (the real node on this machine,
tests/harness/nodes/real.py, and the guest's, tests/harness/nodes/guest_kubelet.py): the kubelet's credentials,
configuration and command line, waiting for the Node to be Ready, and leaving the cluster clean.

No node lifecycle controller runs in the harness's control plane, so each node does its part: it takes the not-ready
taint off once the Node is Ready, and deletes its Node when it stops (the garbage collector then deletes its
ResourceSlices, and the scheduler no longer places pods on a node that is gone).

Both keep their state below one folder by the same names (`NodeFolders`), and both are named by the loopback address
at which the API server reaches their kubelet (`kubelet_argv`): so one set of chart values, without a nodeSelector,
places one DaemonSet on both (tests/harness/local_cluster/cluster.py).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from kubernetes import client

from tests.harness.cluster.chart import chart_values
from tests.harness.cluster.client import Kube, close_api_client
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.component import Component
from tests.harness.poll import NotYet, WaitTimeout, wait_until

API_NAME = "kubernetes"
"""The API server's name on a node, where pods with the host network resolve it (/etc/hosts); its certificate carries
it."""
START_SECONDS = 180.0
"""For a kubelet to register its Node and get it Ready."""
DRAIN_SECONDS = 90.0


class NodeError(Exception):
    """A node did not start or get Ready; the message carries the kubelet's (and the driver's) log tails."""


@dataclass(frozen=True)
class NodeFolders:
    """Where a node keeps its state below its folder `root` (on this machine or in the guest): the kubelet's root
    folder, containerd's (its sockets and CDI specs), the driver's state."""

    root: PurePosixPath

    @property
    def kubelet(self) -> PurePosixPath:
        return self.root / "kubelet"

    @property
    def containerd(self) -> PurePosixPath:
        return self.root / "containerd"

    @property
    def cdi(self) -> PurePosixPath:
        """The only CDI spec folder containerd reads (hack/testenv/containerd.sh)."""
        return self.containerd / "cdi"

    @property
    def nri_socket(self) -> PurePosixPath:
        return self.containerd / "nri" / "nri.sock"

    @property
    def driver_state(self) -> PurePosixPath:
        return self.root / "dra-cpu-state"

    def chart_values(
        self, node_name: str | None, plane: ControlPlane, metrics_port: int, api_host: str, metrics_host: str
    ) -> dict[str, Any]:
        """The chart's values that install the driver on node `node_name` (on every node of these folders when None),
        reaching the API server at `api_host`, serving metrics and probes at `metrics_host` (see chart_values)."""
        return chart_values(
            node_name=node_name,
            api_server_host=api_host,
            api_server_port=plane.port,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            kubelet_root_dir=str(self.kubelet),
            cdi_root=str(self.cdi),
            nri_socket=str(self.nri_socket),
            state_dir=str(self.driver_state),
        )


def bridge_network(bridge: str, subnet: str, ipam_dir: PurePosixPath) -> dict[str, Any]:
    """A CNI network configuration: pods on a bridge without gateway, masquerade or routes, so that they reach each
    other and nothing else (no iptables rule either)."""
    return {
        "cniVersion": "1.0.0",
        "name": "dra-cpu-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": False,
                "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(ipam_dir)},
            },
        ],
    }


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

    def cordon(self) -> None:
        """No new pod lands on the node (what a controller recreates waits, Pending); DaemonSet pods still do."""
        self.kube.patch(f"/api/v1/nodes/{self.name}", {"spec": {"unschedulable": True}})

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
    address: str = "127.0.0.1",
    port: int,
    cri_socket: str,
    cgroup_root: str,
    pod_logs_dir: str,
    feature_gates: Mapping[str, bool],
) -> dict[str, Any]:
    """The KubeletConfiguration of a test node: serving on `address`:`port`, the cgroupfs driver below containerd's
    cgroup parent, no CPU manager, client certificates of the plane's CA only, and nothing that evicts the tests'
    pods or deletes their images."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
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


def kubelet_argv(binary: Path, config_dir: PurePath, root: PurePath, name: str) -> list[str]:
    """The kubelet's command line: kubelet.yaml and kubelet.kubeconfig in `config_dir`, its own serving certificate
    in config_dir/pki, root folder `root`, node `name`. A node named by an IP address has it as its address (the
    kubelet refuses a loopback --node-ip, but takes one given as the name), where the API server dials it for exec,
    logs and port-forward (as kubernetes' hack/local-up-cluster.sh does)."""
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
