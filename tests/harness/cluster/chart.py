"""dra-cpu on a node as a user installs it (docs/admin.md): the image built from this checkout, imported into the
node's containerd (there is no registry), and `helm install` of charts/dra-cpu, the DaemonSet's pod Ready.

    with DriverImage() as image, InstalledDriver(node, helm, image.archive) as driver:
        pod = driver.ready_pod()

Building the image takes 1 to 3 minutes (podman, the local Debian base; hack/bench/image.sh); the install about 20 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from tests.harness.cluster.client import Kube
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.helm import CHART, Helm
from tests.harness.component import Component, Unavailable
from tests.harness.paths import REPO
from tests.harness.poll import wait_until
from tests.harness.processes import free_port
from tests.harness.runtimes.podman import CONTAINERS_CONF

RELEASE = "dra-cpu"
NAMESPACE = "kube-system"
IMAGE_REPOSITORY, IMAGE_TAG = "localhost/dra-cpu", "dev"  # what hack/bench/image.sh build makes
DEVICE_CLASSES = ("dra.cpu", "dra.cpu.isolated", "dra.hugepages-2mi", "dra.hugepages-1gi", "dra.cpu.extended")


class ChartError(Exception):
    """The image did not build, or helm did not install, upgrade or uninstall; the message carries why."""


def chart_values(
    *,
    node_name: str | None,
    api_server_host: str = "127.0.0.1",
    api_server_port: int,
    metrics_host: str = "127.0.0.1",
    metrics_port: int,
    kubelet_root_dir: str,
    cdi_root: str,
    nri_socket: str,
    state_dir: str,
) -> dict[str, Any]:
    """The values the harness installs with: a node without kube-proxy, the API server reached from the node's own
    network at `api_server_host`, the image imported into containerd (no registry); on node `node_name` only, or on
    every node when None; metrics and probes on `metrics_host`, the node's address (the kubelet probes a host-network
    pod at it), or every address when empty. docs/admin.md shows the same (tests/deploy/test_chart.py holds it to
    this)."""
    return {
        "image": {"repository": IMAGE_REPOSITORY, "tag": IMAGE_TAG, "pullPolicy": "Never"},
        **({} if node_name is None else {"nodeSelector": {"kubernetes.io/hostname": node_name}}),
        "hostNetwork": True,
        "apiServer": {"host": api_server_host, "port": api_server_port},
        "metricsHost": metrics_host,
        "metricsPort": metrics_port,
        "kubeletRootDir": kubelet_root_dir,
        "cdiRoot": cdi_root,
        "nriSocket": nri_socket,
        "stateDir": state_dir,
    }


@dataclass
class DriverImage(Component):
    """The driver's image built from this checkout (hack/bench/image.sh build), saved as an OCI archive."""

    archive: Path = Path()

    def start(self) -> None:
        if shutil.which("podman") is None or not CONTAINERS_CONF.exists():
            raise Unavailable("podman is not installed: run hack/testenv/podman.sh install")
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        built = subprocess.run(
            ["bash", str(REPO / "hack" / "bench" / "image.sh"), "build"],
            env=env, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if built.returncode != 0:
            raise ChartError(f"the image did not build:\n{built.stderr[-4000:]}")
        self.archive = Path(tempfile.mkdtemp(prefix="dra-cpu-image-")) / "dra-cpu.tar"
        saved = subprocess.run(
            ["podman", "save", "--format", "oci-archive", "-o", str(self.archive), built.stdout.strip()],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if saved.returncode != 0:
            raise ChartError(f"podman save failed:\n{saved.stderr[-2000:]}")

    def stop(self) -> None:
        if self.archive != Path():
            shutil.rmtree(self.archive.parent, ignore_errors=True)
            self.archive = Path()


class ChartNode(Protocol):
    """What installing the chart needs of a node."""

    @property
    def name(self) -> str: ...

    @property
    def plane(self) -> ControlPlane: ...

    @property
    def kube(self) -> Kube: ...

    def chart_values(self, metrics_port: int) -> dict[str, Any]:
        """The chart's values that place the driver on this node: its folders, sockets and name."""
        ...

    def import_image(self, archive: Path) -> None:
        """The image archive into the node's containerd, where its kubelet finds it."""
        ...

    def describe(self) -> str:
        """The node's logs, for failure messages."""
        ...


N = TypeVar("N", bound=ChartNode)


@dataclass
class InstalledDriver(Component, Generic[N]):
    """dra-cpu installed on `node` with the chart: `start()` imports the image, runs `helm install` with the node's
    `chart_values` and waits for the pod to be Ready; `stop()` runs `helm uninstall` and waits for the pod to go.
    With `more_nodes`, the one release runs on those too: `values` must then fit them all (no nodeSelector, the
    same folders on every node), the image is imported into each, and each gets its Ready pod."""

    node: N
    helm: Helm
    archive: Path
    values: dict[str, Any] = field(default_factory=dict)
    more_nodes: tuple[ChartNode, ...] = ()

    def __post_init__(self) -> None:
        if not self.values:
            self.values = self.node.chart_values(free_port())

    @property
    def nodes(self) -> tuple[ChartNode, ...]:
        return (self.node, *self.more_nodes)

    @property
    def state_dir(self) -> Path:
        return Path(self.values["stateDir"])

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.values['metricsPort']}"

    def start(self) -> None:
        for node in self.nodes:
            node.import_image(self.archive)
        # Other tests of the session put the chart's DeviceClasses on the same control plane without helm (e.g.
        # tests/kube's `classes_file`); helm refuses to adopt objects it did not make, so those go first.
        kube = self.node.kube
        for name in DEVICE_CLASSES:
            path = f"/apis/resource.k8s.io/v1/deviceclasses/{name}"
            found = kube.find(path)
            if found is not None and "meta.helm.sh/release-name" not in found["metadata"].get("annotations", {}):
                kube.delete(path)
        self._helm("install", "--wait", "--timeout", "8m", values=self.values)
        for node in self.nodes:
            self.ready_pod(node=node.name)

    def stop(self) -> None:
        """helm uninstall, then until the driver's pods are gone (the kubelet unregisters the plugin)."""
        if self._helm_run("status").returncode != 0:
            return  # never installed
        self._helm("uninstall", "--wait", "--timeout", "4m")
        wait_until(lambda: not self.pods(), "the driver's pods to be gone after helm uninstall", 240)

    def upgrade(self, values: Mapping[str, Any], wait: bool = True) -> None:
        self._helm("upgrade", *(["--wait", "--timeout", "8m"] if wait else []), values=values)

    def devices(self) -> list[dict[str, Any]]:
        """The devices the driver publishes now."""
        slices = self.node.kube.list("/apis/resource.k8s.io/v1/resourceslices", field_selector="spec.driver=dra.cpu")
        return [d for s in sorted(slices, key=lambda s: str(s["metadata"]["name"])) for d in s["spec"]["devices"]]

    @contextlib.contextmanager
    def reconfigured(
        self, change: Mapping[str, Mapping[str, Any]], published: Callable[[list[dict[str, Any]]], bool], what: str
    ) -> Iterator[InstalledDriver[N]]:
        """The driver upgraded (helm upgrade) with `change` merged into its values' sections (e.g. {"config":
        {...}}), its new pod Ready and `published(devices)` true; afterwards back to the values and devices of
        before."""
        before = self.devices()

        def upgrade(values: Mapping[str, Any], done: Callable[[], bool], state: str) -> None:
            old = self.ready_pod()["metadata"]["name"]
            self.upgrade(values)
            self.ready_pod(other_than=old)
            wait_until(done, state, 120)

        changed = {**self.values, **{key: {**self.values.get(key, {}), **part} for key, part in change.items()}}
        upgrade(changed, lambda: published(self.devices()), what)
        try:
            yield self
        finally:
            upgrade(self.values, lambda: self.devices() == before, "the devices of before")

    def pods(self) -> list[dict[str, Any]]:
        return self.node.kube.list(
            f"/api/v1/namespaces/{NAMESPACE}/pods", label_selector=f"app.kubernetes.io/instance={RELEASE}"
        )

    def ready_pod(self, timeout: float = 120, other_than: str = "", node: str = "") -> dict[str, Any]:
        """The driver's pod once Ready (registered with the kubelet, slices published); with `other_than`, a pod of
        another name (the one the DaemonSet made in its place); with `node`, the pod on that node."""

        def ready() -> dict[str, Any] | None:
            for pod in self.pods():
                if pod["metadata"].get("deletionTimestamp") or pod["metadata"]["name"] == other_than:
                    continue
                if node and pod["spec"].get("nodeName") != node:
                    continue
                conditions = pod.get("status", {}).get("conditions", [])
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return pod
            return None

        where = f" on {node}" if node else ""
        return wait_until(ready, f"the dra-cpu pod{where} to be Ready", timeout, 0.5, details=self.describe)

    def logs(self, name: str, tail: int = -1) -> str:
        """The log of the driver pod `name` (its last `tail` lines; all by default), or kubectl's error."""
        logs = self.node.plane.kubectl("-n", NAMESPACE, "logs", name, f"--tail={tail}")
        return logs.stdout + logs.stderr

    def describe(self) -> str:
        """The driver pods' status and logs, and the nodes', for failure messages."""
        lines = []
        for pod in self.pods():
            name = pod["metadata"]["name"]
            lines.append(f"pod {name}: {json.dumps(pod.get('status', {}).get('containerStatuses'))}")
            lines.append(self.logs(name, tail=30))
        lines.extend(node.describe() for node in self.nodes)
        return "\n".join(lines)

    def _helm(self, verb: str, *args: str, values: Mapping[str, Any] | None = None) -> None:
        done = self._helm_run(verb, *args, values=values)
        if done.returncode != 0:
            raise ChartError(f"helm {verb} failed:\n{done.stdout}\n{done.stderr}\n{self.describe()}")

    def _helm_run(
        self, verb: str, *args: str, values: Mapping[str, Any] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """helm VERB RELEASE [CHART] ARGS against the node's cluster in the release's namespace; `values` (install,
        upgrade) go in a values file."""
        chart = [str(CHART)] if verb in ("install", "upgrade") else []
        options = ["--namespace", NAMESPACE, "--kubeconfig", str(self.node.plane.kubeconfig)]
        with tempfile.NamedTemporaryFile("w", prefix="dra-cpu-values-", suffix=".yaml") as values_file:
            if values is not None:
                values_file.write(json.dumps(values, indent=2) + "\n")
                values_file.flush()
                options += ["-f", values_file.name]
            return self.helm.run(verb, RELEASE, *chart, *args, *options, timeout=300)
