"""pytest plugin: a real node. The kubelet of hack/testenv/kubernetes.sh (the control plane's version) joined to the
test control plane, with containerd 2.1 (CRI, NRI, CDI; hack/testenv/containerd.sh) as its runtime and a CNI bridge
from Debian's containernetworking-plugins, so that the Node is Ready and pods really run.

    def test_x(real_node: RealNode) -> None:
        pod = real_node.kube.get(...)

Fixture `real_node` (session scope: the node starts once, for the tests that ask for it) yields a `RealNode`;
tests that use it are marked `kubelet`. `RealNode.running(plane, ...)` gives the same node outside pytest
(hack/bench/pods.py).

How it fits these machines (docs/limits.md says what this leaves untested):
- The node is named `127.0.0.1` (`--hostname-override`, as kubernetes' hack/local-up-cluster.sh does): a kubelet
  refuses a loopback --node-ip, but takes an IP given as the hostname for the node's address, so the API server
  reaches the kubelet (exec, logs) on loopback and nothing listens on another interface.
- Hybrid cgroups (v1 controllers): `failCgroupV1: false`, cgroupDriver cgroupfs, and every pod cgroup below the
  containerd run's own cgroup parent (`cgroupRoot`), which containerd.sh stop removes.
- No CAP_SYS_RESOURCE: `oomScoreAdj: 0` for the kubelet; containerd's `restrict_oom_score_adj` clamps the negative
  scores the kubelet asks for containers.
- The kubelet sets six kernel sysctls at start (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops, ...) and
  iptables chains (KUBE-FIREWALL) in the host's tables. Neither may change on a shared machine: the kubelet runs in
  a mount namespace of its own in which those /proc/sys files read the values it wants (so it writes nothing), and
  with a PATH without iptables (so it skips its chains, as on an nftables-only host). Its root folder is a shared
  mount, so that the volumes it mounts for pods reach containerd in the host's mount namespace.
- The kubelet's `not-ready` taint is removed as the node lifecycle controller would (the control plane runs none).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Kube, wait_for
from tests.support.control_plane import ControlPlane, close, free_port, log_tail, write_kubeconfig
from tests.support.cri import Allowed, CriError
from tests.support.gen import cri_runtime_v1_pb2 as pb
from tests.support.paths import REPO
from tests.support.testenv_containerd import VERSIONS, Containerd, _start, _stop
from tests.support.testenv_helm import CHART, Helm

NODE_NAME = "127.0.0.1"
EXAMPLE_IMAGE = "docker.io/library/busybox:1.36"
"""The image hack/examples' pods name; the node has the test busybox image under that name (no registry here)."""
START_SECONDS = float(os.environ.get("DRA_CPU_KUBELET_START_SECONDS", "180"))
# What the kubelet's setupKernelTunables wants (pkg/kubelet/cm/container_manager_linux.go); shown to it, not set.
KERNEL_TUNABLES: Mapping[str, str] = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
# The kubelet's PATH: mount and umount, no iptables (/usr/sbin).
KUBELET_PATH = "/usr/local/bin:/usr/bin:/bin"


class NodeError(Exception):
    """The kubelet did not start or the node did not get Ready; the message carries the kubelet's log tail."""


def containerd_version() -> str:
    """The containerd 2.x the test environment has."""
    return next(v for v in VERSIONS if v.startswith("2."))


@dataclass
class RealNode:
    plane: ControlPlane
    dir: Path
    """The kubelet's files: config, credentials, root folder (`root`), log; short, for socket paths."""
    feature_gates: Mapping[str, bool]
    containerd: Containerd | None = None
    name: str = NODE_NAME
    port: int = 0
    bridge: str = ""
    vmodule: str = ""
    """The kubelet's --vmodule (e.g. dra_plugin=4 logs each NodePrepareResources call with its time)."""
    _kubelet: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _api: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------------------------
    # Where things are.

    @property
    def root(self) -> Path:
        """The kubelet's --root-dir (the chart's kubeletRootDir)."""
        return self.dir / "root"

    @property
    def log(self) -> Path:
        return self.dir / "kubelet.log"

    @property
    def runtime(self) -> Containerd:
        assert self.containerd is not None, "the node is not started"
        return self.containerd

    @property
    def cdi_dir(self) -> Path:
        return self.runtime.cdi_dir

    @property
    def nri_socket(self) -> Path:
        return self.runtime.nri_socket

    @property
    def cgroup_root(self) -> str:
        """The kubelet's cgroupRoot: pods are below <this>/kubepods."""
        return self.runtime.cgroup_parent

    @property
    def kube(self) -> Kube:
        if self._api is None:
            self._api = self.plane.admin()
        return Kube(self._api)

    # ------------------------------------------------------------------------------------------------------------
    # Starting and stopping.

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.containerd = _start(containerd_version())
        self._images()
        self._cni()
        self._cgroup_root()
        self._credentials()
        self._config()
        self._share_root()
        self.start_kubelet()
        self.wait_ready()

    def stop(self) -> None:
        """Deletes every pod bound to the node (so the kubelet unmounts their volumes and unprepares their claims),
        stops the kubelet and containerd, and removes every mount, cgroup, interface and file the node made."""
        try:
            if self._kubelet is not None and self._kubelet.poll() is None:
                drain(self.kube, self.name)
        finally:
            self.stop_kubelet()
            if self.containerd is not None:
                with contextlib.suppress(Exception):
                    self.containerd.cri.cleanup()
                _stop(self.containerd)
                self.containerd = None
            self._unmount_all()
            if self.bridge:
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
            if self._api is not None:
                # No node lifecycle controller would ever mark it NotReady: without its Node (whose slices the
                # garbage collector then deletes), the scheduler cannot place later pods on a node that is gone.
                with contextlib.suppress(Exception):
                    self.kube.delete(f"/api/v1/nodes/{self.name}")
                close(self._api)
                self._api = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def _images(self) -> None:
        """hack/examples' image name for the test busybox image (containerd.sh imported it)."""
        self.ctr("images", "tag", "--force", "localhost/busybox:latest", EXAMPLE_IMAGE)

    def ctr(self, *args: str, stdin: bytes | None = None, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        """`ctr -n k8s.io ARGS` against the node's containerd."""
        bin_dir = Path("/var/cache/dra-cpu-testenv") / f"containerd-{self.runtime.version}" / "usr" / "bin"
        return subprocess.run(
            [str(bin_dir / "ctr"), "-a", str(self.runtime.cri_socket), "-n", "k8s.io", *args],
            input=stdin, capture_output=True, check=True, timeout=timeout,
        )  # fmt: skip

    def _cni(self) -> None:
        """A bridge without gateway, masquerade or routes: pods reach each other and nothing else."""
        tag = self.runtime.cgroup_parent.rsplit("-", 1)[-1][:8]
        self.bridge = f"dracpu{tag}"
        octet = int(tag[:2], 16) % 200 + 20
        conflist = {
            "cniVersion": "1.0.0",
            "name": "dra-cpu-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": False,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": f"10.{octet}.{int(tag[2:4], 16)}.0/24"}]],
                        "dataDir": str(self.dir / "cni-ipam"),
                    },
                },
            ],
        }
        (self.runtime.dir / "cni" / "10-dra-cpu-test.conflist").write_text(json.dumps(conflist, indent=2))

    def _cgroup_root(self) -> None:
        """The kubelet requires its cgroupRoot to exist in every hierarchy; a v1 cpuset starts empty."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if not (hierarchy / "cgroup.procs").exists():
                continue
            path = hierarchy / self.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (path / name).exists() and not (path / name).read_text().strip():
                    (path / name).write_text((hierarchy / name).read_text())

    def _credentials(self) -> None:
        user = node_user(self.plane, self.name, f"kubelet-{self.dir.name}")
        write_kubeconfig(self.dir / "kubelet.kubeconfig", self.plane.url, self.plane.pki.ca, user)

    def _config(self) -> None:
        self.port = free_port()
        config = kubelet_configuration(
            self.plane,
            port=self.port,
            cri_socket=str(self.runtime.cri_socket),
            cgroup_root=self.cgroup_root,
            pod_logs_dir=str(self.dir / "pod-logs"),
            feature_gates=self.feature_gates,
        )
        (self.dir / "kubelet.yaml").write_text(json.dumps(config, indent=2) + "\n")
        for name, value in KERNEL_TUNABLES.items():
            (self.dir / "sysctl").mkdir(exist_ok=True)
            (self.dir / "sysctl" / name.replace("/", ".")).write_text(value + "\n")

    def _share_root(self) -> None:
        """The root folder as a shared mount of its own: the kubelet's mounts in its namespace propagate here."""
        subprocess.run(["mount", "--bind", str(self.root), str(self.root)], check=True, capture_output=True)
        subprocess.run(["mount", "--make-shared", str(self.root)], check=True, capture_output=True)

    def _unmount_all(self) -> None:
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        prefix = f"{self.dir}/"
        for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def kubelet_command(self) -> list[str]:
        binary = self.plane.binaries.path("kubelet")
        fakes = " && ".join(
            f"mount --bind {shlex.quote(str(self.dir / 'sysctl' / name.replace('/', '.')))} /proc/sys/{name}"
            for name in KERNEL_TUNABLES
        )
        kubelet = shlex.join(
            [
                *kubelet_argv(binary, self.dir, self.root, self.name),
                *([f"--vmodule={self.vmodule}"] if self.vmodule else []),
            ]
        )
        return ["unshare", "--mount", "--propagation", "unchanged", "--", "/bin/sh", "-c", f"{fakes} && exec {kubelet}"]

    def start_kubelet(self) -> None:
        with self.log.open("ab") as out:
            self._kubelet = subprocess.Popen(
                self.kubelet_command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": KUBELET_PATH},
            )

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        proc = self._kubelet
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._kubelet = None

    def restart_kubelet(self) -> None:
        self.stop_kubelet()
        self.start_kubelet()
        self.wait_ready()

    def restart_containerd(self, nri: bool = True) -> None:
        """Stops containerd (its containers keep running under their shims) and starts it again on the same state;
        `nri=False` starts it with NRI disabled (no NRI socket: dra-cpu cannot enforce)."""
        daemon = self.runtime
        pid = int((daemon.dir / "containerd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        script = Path(__file__).resolve().parents[2] / "hack" / "testenv" / "containerd.sh"
        subprocess.run(
            ["bash", str(script), "start", daemon.version, str(daemon.dir)],
            env={**os.environ, "NRI": "on" if nri else "off"},
            check=True,
            capture_output=True,
        )

    def kubelet_log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)

    def wait_ready(self, timeout: float = START_SECONDS) -> dict[str, Any]:
        """The Node once Ready, without the not-ready taint; fails with the kubelet's log tail."""

        def exited() -> str:
            if self._kubelet is None or self._kubelet.poll() is not None:
                return f"the kubelet exited ({None if self._kubelet is None else self._kubelet.returncode})"
            return ""

        return wait_node_ready(
            self.kube,
            self.name,
            timeout,
            exited=exited,
            # The plugin watcher's folder, which the driver's DaemonSet mounts (type Directory), comes a moment later.
            also=lambda: (self.root / "plugins_registry").is_dir(),
            log=lambda: f"{self.log}:\n{self.kubelet_log_tail()}",
        )

    # ------------------------------------------------------------------------------------------------------------
    # Looking into containers.

    def exec(self, container_id: str, cmd: list[str], timeout: float = 30) -> str:
        """Runs `cmd` in a container (CRI ExecSync) and returns its stdout; a non-zero exit raises CriError."""
        request = pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=int(timeout))
        response = self.runtime.cri.runtime.ExecSync(request, timeout=timeout + 5)
        if response.exit_code != 0:
            raise CriError(f"{cmd} in {container_id[:12]} exited {response.exit_code}: {response.stderr.decode()}")
        return str(response.stdout.decode())

    def allowed_inside(self, container_id: str) -> Allowed:
        """Cpus_allowed_list and Mems_allowed_list of a new process in the container."""
        return Allowed.parse(self.exec(container_id, ["cat", "/proc/self/status"]))

    def container_info(self, container_id: str) -> dict[str, Any]:
        request = pb.ContainerStatusRequest(container_id=container_id, verbose=True)
        response = self.runtime.cri.runtime.ContainerStatus(request, timeout=30)
        info: dict[str, Any] = json.loads(response.info["info"])
        return info

    def host_cgroup(self, container_id: str, controller: str, pod: bool = False) -> Path:
        """The folder of the container's cgroup (or, with `pod`, of its pod's) for `controller`, on the host: the
        controller's v1 hierarchy here, the unified one on a cgroup v2 host."""
        info = self.container_info(container_id)
        path = Path(str(info["runtimeSpec"]["linux"]["cgroupsPath"]).lstrip("/"))
        for base in (Path("/sys/fs/cgroup") / controller, Path("/sys/fs/cgroup")):
            folder = base / path
            if (folder / "cgroup.procs").exists() and any(folder.glob(f"{controller}.*")):
                return folder.parent if pod else folder
        raise CriError(f"no {controller} cgroup for {container_id[:12]} at {path}")

    def host_cpuset(self, container_id: str) -> tuple[str, str]:
        """cpuset.cpus and cpuset.mems of the container's cgroup, read on the host (cgroup v1 here, v2 elsewhere)."""
        folder = self.host_cgroup(container_id, "cpuset")
        cpus = (folder / "cpuset.cpus").read_text().strip()
        mems = (folder / "cpuset.mems").read_text().strip()
        if not cpus and (folder / "cpuset.cpus.effective").exists():  # v2: empty means the parent's
            cpus = (folder / "cpuset.cpus.effective").read_text().strip()
        return cpus, mems

    def host_cpu_quota(self, container_id: str) -> Fraction | None:
        """The container's CFS quota in CPUs as its cgroup has it (v1 cpu.cfs_quota_us / cpu.cfs_period_us, v2
        cpu.max), None for none."""
        folder = self.host_cgroup(container_id, "cpu")
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota, period = ((folder / f"cpu.cfs_{f}_us").read_text().strip() for f in ("quota", "period"))
        return None if quota in ("max", "-1") else Fraction(int(quota), int(period))

    def host_pod_cpu_shares(self, container_id: str) -> int:
        """The CPU weight of the container's pod cgroup, as the kubelet's shares (v1 cpu.shares; v2 cpu.weight, which
        the kubelet derives from the shares, converted back)."""
        folder = self.host_cgroup(container_id, "cpu", pod=True)
        if (folder / "cpu.weight").exists():
            weight = int((folder / "cpu.weight").read_text())
            return round(2 + (weight - 1) * 262142 / 9999)
        return int((folder / "cpu.shares").read_text())


def _ready(node: Mapping[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))


# ----------------------------------------------------------------------------------------------------------------
# What any kubelet joined to the test control plane needs (this node, and the test guest's: guest_kubelet.py).


def node_user(plane: ControlPlane, name: str, cert: str) -> dict[str, str]:
    """A kubeconfig user for the kubelet of node `name`: a client certificate (file `cert` in the plane's PKI) of
    group system:nodes and user system:node:<name>, which the Node authorizer and NodeRestriction admit."""
    pki = plane.pki
    pki.issue(cert, f"/O=system:nodes/CN=system:node:{name}")
    return {"client-certificate": str(pki.dir / f"{cert}.crt"), "client-key": str(pki.dir / f"{cert}.key")}


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


def drain(kube: Kube, name: str, timeout: float = 90.0) -> None:
    """Deletes node `name`'s pods and waits for those no DaemonSet brings back (uninstall DaemonSets first), so that
    its kubelet unmounts their volumes and unprepares their claims before it stops."""

    def pods() -> list[dict[str, Any]]:
        return kube.list("/api/v1/pods", field_selector=f"spec.nodeName={name}")

    def owned_by_daemonset(pod: Mapping[str, Any]) -> bool:
        return any(o.get("kind") == "DaemonSet" for o in pod["metadata"].get("ownerReferences", []))

    for pod in pods():
        meta = pod["metadata"]
        kube.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
    with contextlib.suppress(AssertionError):
        wait_for(
            lambda: not [p for p in pods() if not owned_by_daemonset(p)],
            f"the pods of node {name} to be gone",
            timeout,
            interval=0.5,
        )


def wait_node_ready(
    kube: Kube,
    name: str,
    timeout: float,
    *,
    exited: Callable[[], str],
    log: Callable[[], str],
    also: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Node `name` once Ready (and `also()`), with the not-ready taint taken off as the node lifecycle controller
    would (the control plane runs none). Raises NodeError with `log()` (the kubelet's log tail) when `exited()` says
    why the kubelet is gone, or on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        gone = exited()
        if gone:
            raise NodeError(f"{gone}; {log()}")
        node = kube.find(f"/api/v1/nodes/{name}")
        if node is not None and _ready(node) and also():
            taints = node["spec"].get("taints") or []
            kept = [t for t in taints if not t["key"].startswith("node.kubernetes.io/not-ready")]
            if kept != taints:
                node = kube.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": kept or None}})
            return dict(node)
        if time.monotonic() > deadline:
            status = json.dumps((node or {}).get("status", {}).get("conditions"), indent=1)
            raise NodeError(f"node {name} not Ready after {timeout:.0f} s (conditions {status}); {log()}")
        time.sleep(0.5)


def container_id(pod: Mapping[str, Any], name: str | None = None) -> str:
    """The runtime id of a pod's container (the first, or the one named `name`)."""
    for status in pod.get("status", {}).get("containerStatuses", []):
        if name is None or status["name"] == name:
            return str(status["containerID"]).split("://", 1)[1]
    raise AssertionError(f"pod {pod['metadata']['name']} has no container {name or ''} status")


@contextlib.contextmanager
def running(
    plane: ControlPlane, feature_gates: Mapping[str, bool] | None = None, vmodule: str = ""
) -> Iterator[RealNode]:
    """A started RealNode for the body of the `with`; raises NodeError (with the kubelet's log) when it does not
    start, and cleans up either way."""
    if os.geteuid() != 0:
        raise NodeError("a real node needs root")
    gates = kubelet_gates(plane, feature_gates)
    node = RealNode(plane, Path(tempfile.mkdtemp(prefix="dra-kl-", dir="/tmp")), gates, vmodule=vmodule)
    try:
        node.start()
        yield node
    finally:
        node.stop()


# ----------------------------------------------------------------------------------------------------------------
# dra-cpu installed on the node as a user installs it: the image built by podman, helm install of charts/dra-cpu.

RELEASE = "dra-cpu"
NAMESPACE = "kube-system"
IMAGE_REPOSITORY, IMAGE_TAG = "localhost/dra-cpu", "dev"  # what hack/bench/image.sh build makes


def build_image() -> Path:
    """hack/bench/image.sh build (podman, the local Debian base), saved as an OCI archive for containerd."""
    env = {**os.environ, "CONTAINERS_CONF": "/var/cache/dra-cpu-testenv/podman/containers.conf"}
    built = subprocess.run(
        ["bash", str(REPO / "hack" / "bench" / "image.sh"), "build"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if built.returncode != 0:
        raise NodeError(f"the image did not build:\n{built.stderr[-4000:]}")
    archive = Path(tempfile.mkdtemp(prefix="dra-cpu-image-")) / "dra-cpu.tar"
    saved = subprocess.run(
        ["podman", "save", "--format", "oci-archive", "-o", str(archive), built.stdout.strip()],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if saved.returncode != 0:
        raise NodeError(f"podman save failed:\n{saved.stderr[-2000:]}")
    return archive


def chart_values(
    *,
    node_name: str,
    api_server_port: int,
    metrics_port: int,
    kubelet_root_dir: str,
    cdi_root: str,
    nri_socket: str,
    state_dir: str,
) -> dict[str, Any]:
    """The values the tests install with: a node without kube-proxy, the API server on the node's loopback, the
    image imported into containerd (no registry). docs/admin.md shows the same (tests/deploy/test_chart.py holds it
    to this)."""
    return {
        "image": {"repository": IMAGE_REPOSITORY, "tag": IMAGE_TAG, "pullPolicy": "Never"},
        "nodeSelector": {"kubernetes.io/hostname": node_name},
        "hostNetwork": True,
        "apiServer": {"host": "127.0.0.1", "port": api_server_port},
        "metricsHost": "127.0.0.1",
        "metricsPort": metrics_port,
        "kubeletRootDir": kubelet_root_dir,
        "cdiRoot": cdi_root,
        "nriSocket": nri_socket,
        "stateDir": state_dir,
    }


def node_chart_values(node: RealNode, metrics_port: int) -> dict[str, Any]:
    return chart_values(
        node_name=node.name,
        api_server_port=int(node.plane.url.rsplit(":", 1)[1]),
        metrics_port=metrics_port,
        kubelet_root_dir=str(node.root),
        cdi_root=str(node.cdi_dir),
        nri_socket=str(node.nri_socket),
        state_dir=str(node.dir / "dra-cpu-state"),
    )


@dataclass
class InstalledDriver:
    node: RealNode
    helm: Path
    values: dict[str, Any]

    @property
    def state_dir(self) -> Path:
        return Path(self.values["stateDir"])

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.values['metricsPort']}"

    def helm_run(self, *args: str, values: Mapping[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        """helm ARGS against the node's cluster in the release's namespace; `values` (install, upgrade) go in a
        values file."""
        options = ["--namespace", NAMESPACE, "--kubeconfig", str(self.node.plane.kubeconfig)]
        if values is not None:
            values_file = self.node.dir / "values.yaml"
            values_file.write_text(json.dumps(values, indent=2) + "\n")
            options += ["-f", str(values_file)]
        return subprocess.run(
            [str(self.helm), *args, *options], capture_output=True, text=True, timeout=300, check=False
        )

    def install(self) -> None:
        # Other tests of the session put the chart's DeviceClasses on the same control plane without helm (e.g.
        # tests/kube's `classes_file`); helm refuses to adopt objects it did not make, so those go first.
        kube = self.node.kube
        for name in ("dra.cpu", "dra.cpu.isolated", "dra.hugepages-2mi", "dra.hugepages-1gi", "dra.cpu.extended"):
            path = f"/apis/resource.k8s.io/v1/deviceclasses/{name}"
            found = kube.find(path)
            if found is not None and "meta.helm.sh/release-name" not in found["metadata"].get("annotations", {}):
                kube.delete(path)
        done = self.helm_run("install", RELEASE, str(CHART), "--wait", "--timeout", "4m", values=self.values)
        if done.returncode != 0:
            raise NodeError(f"helm install failed:\n{done.stderr}\n{self.describe()}")

    def upgrade(self, values: Mapping[str, Any], wait: bool = True) -> None:
        done = self.helm_run(
            "upgrade", RELEASE, str(CHART), *(["--wait", "--timeout", "4m"] if wait else []), values=values
        )
        if done.returncode != 0:
            raise NodeError(f"helm upgrade failed:\n{done.stderr}\n{self.describe()}")

    def devices(self) -> list[dict[str, Any]]:
        """The devices the driver publishes now."""
        slices = self.node.kube.list("/apis/resource.k8s.io/v1/resourceslices", field_selector="spec.driver=dra.cpu")
        return [d for s in sorted(slices, key=lambda s: str(s["metadata"]["name"])) for d in s["spec"]["devices"]]

    @contextlib.contextmanager
    def reconfigured(
        self, change: Mapping[str, Mapping[str, Any]], published: Callable[[list[dict[str, Any]]], bool], what: str
    ) -> Iterator[InstalledDriver]:
        """The driver upgraded (helm upgrade) with `change` merged into its values' sections (e.g. {"config":
        {...}}), its new pod Ready and `published(devices)` true; afterwards back to the values and devices of
        before."""
        before = self.devices()

        def upgrade(values: Mapping[str, Any], done: Callable[[], bool], state: str) -> None:
            old = self.ready_pod()["metadata"]["name"]
            self.upgrade(values)
            self.ready_pod(other_than=old)
            wait_for(done, state, 120)

        changed = {**self.values, **{key: {**self.values.get(key, {}), **part} for key, part in change.items()}}
        upgrade(changed, lambda: published(self.devices()), what)
        try:
            yield self
        finally:
            upgrade(self.values, lambda: self.devices() == before, "the devices of before")

    def uninstall(self) -> None:
        """helm uninstall, then until the driver's pods are gone (the kubelet unregisters the plugin)."""
        done = self.helm_run("uninstall", RELEASE, "--wait", "--timeout", "2m")
        if done.returncode != 0:
            raise NodeError(f"helm uninstall failed:\n{done.stdout}\n{done.stderr}")
        wait_for(lambda: not self.pods(), "the driver's pods to be gone after helm uninstall", 120)

    def pods(self) -> list[dict[str, Any]]:
        return self.node.kube.list(
            f"/api/v1/namespaces/{NAMESPACE}/pods", label_selector=f"app.kubernetes.io/instance={RELEASE}"
        )

    def ready_pod(self, timeout: float = 120, other_than: str = "") -> dict[str, Any]:
        """The driver's pod once Ready (registered with the kubelet, slices published); with `other_than`, a pod of
        another name (the one the DaemonSet made in its place)."""

        def ready() -> dict[str, Any] | None:
            for pod in self.pods():
                if pod["metadata"].get("deletionTimestamp") or pod["metadata"]["name"] == other_than:
                    continue
                conditions = pod.get("status", {}).get("conditions", [])
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return pod
            return None

        try:
            return wait_for(ready, "the dra-cpu pod to be Ready", timeout, interval=0.5)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.describe()}") from None

    def describe(self) -> str:
        """The driver pods' status and logs, for failure messages."""
        lines = []
        for pod in self.pods():
            name = pod["metadata"]["name"]
            lines.append(f"pod {name}: {json.dumps(pod.get('status', {}).get('containerStatuses'))}")
            logs = self.node.plane.kubectl("-n", NAMESPACE, "logs", name, "--tail=30")
            lines.append(logs.stdout + logs.stderr)
        lines.append("kubelet: " + self.node.kubelet_log_tail(20))
        return "\n".join(lines)


@pytest.fixture(scope="module")
def real_node(request: pytest.FixtureRequest, control_plane: ControlPlane) -> Iterator[RealNode]:
    """The kubelet and containerd on this machine, joined to `control_plane` as node 127.0.0.1, for the tests of a
    module (so that the session's other tests never see a real node their unpinned pods could land on)."""
    if os.geteuid() != 0:
        pytest.skip("a real node needs root")
    if shutil.which("unshare") is None or not Path("/usr/lib/cni/bridge").exists():
        pytest.skip("the real node needs unshare and containernetworking-plugins (hack/install-testenv.sh)")
    failure = ""
    try:
        with running(control_plane) as node:
            yield node
            if request.session.testsfailed:
                keep = Path(tempfile.mkdtemp(prefix="dra-cpu-kubelet-log-"))
                shutil.copy(node.log, keep / "kubelet.log")
                print(f"kubelet log kept in {keep}")
    except NodeError as err:
        failure = str(err)
    if failure:
        pytest.fail(f"the real node did not start: {failure}", pytrace=False)


@contextlib.contextmanager
def image_archive() -> Iterator[Path]:
    """The image (`build_image`) as an OCI archive, removed at the end."""
    archive = build_image()
    try:
        yield archive
    finally:
        shutil.rmtree(archive.parent, ignore_errors=True)


@contextlib.contextmanager
def installed(node: RealNode, helm: Path, archive: Path) -> Iterator[InstalledDriver]:
    """dra-cpu on `node` as a user installs it: the image archive imported into containerd's k8s.io namespace,
    `helm install` of charts/dra-cpu with `chart_values`, its pod Ready; `helm uninstall` at the end. Raises NodeError
    or AssertionError (with the driver's logs) when it does not get Ready."""
    node.ctr("images", "import", str(archive))
    driver = InstalledDriver(node, helm, node_chart_values(node, free_port()))
    try:
        driver.install()
        driver.ready_pod()
        yield driver
    finally:
        driver.uninstall()


@pytest.fixture(scope="session")
def dra_cpu_image() -> Iterator[Path]:
    """The driver's image as an OCI archive, built once per test run."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: run hack/testenv/podman.sh install")
    failure = ""
    try:
        with image_archive() as archive:
            yield archive
    except NodeError as err:
        failure = str(err)
    if failure:
        pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="module")
def dra_cpu_node(real_node: RealNode, helm: Helm, dra_cpu_image: Path) -> Iterator[InstalledDriver]:
    """dra-cpu installed on the real node (`installed`), for the tests of a module."""
    failure = ""
    try:
        with installed(real_node, helm.binary, dra_cpu_image) as driver:
            yield driver
    except (NodeError, AssertionError) as err:
        failure = str(err)
    if failure:
        pytest.fail(failure, pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"real_node", "dra_cpu_node"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kubelet)
