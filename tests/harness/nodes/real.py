"""The real node: the kubelet of hack/testenv/kubernetes.sh (the control plane's version) on this machine, joined to
the harness's control plane, with containerd 2.x (CRI, NRI, CDI; hack/testenv/containerd.sh) as its runtime and a
CNI bridge from Debian's containernetworking-plugins, so that the Node is Ready and pods really run.

    with ControlPlane(state_dir) as plane, RealNode(plane) as node:
        node.kube.create(pod, namespace)

Starting it takes 20 to 60 s on two busy cores (containerd, the kubelet's registration, the Node getting Ready);
it needs root, unshare and the CNI plugins. The driver is installed on it as users install it by
tests/harness/cluster/chart.py (helm, the DaemonSet). How it fits these machines (docs/limits.md says what this
leaves untested):
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
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from dra_cpu.core.cdi_spec import ENV_CPUSET, ENV_MEMS
from dra_cpu.core.cpuset import CPUSet
from tests.harness.cluster.chart import chart_values
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.pki import write_kubeconfig
from tests.harness.component import Unavailable
from tests.harness.nodes.kubelet import (
    KubeletNode,
    container_id,
    kubelet_argv,
    kubelet_configuration,
    kubelet_gates,
)
from tests.harness.poll import NotYet, wait_until
from tests.harness.processes import free_port, log_tail, spawn, stop_group
from tests.harness.runtimes.containerd import Containerd, newest_2x
from tests.harness.runtimes.cri import Allowed, CriError

NODE_NAME = "127.0.0.1"
EXAMPLE_IMAGE = "docker.io/library/busybox:1.36"
"""The image hack/examples' pods name; the node has the test busybox image under that name (no registry here)."""
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
CNI_BRIDGE = Path("/usr/lib/cni/bridge")


@dataclass(frozen=True)
class Pinning:
    """One container's CPUs and memory nodes, every way they can be seen."""

    claimed: dict[str, CPUSet]  # claim UID -> DRA_CPUSET_<uid> in the container's environment
    mems_env: dict[str, CPUSet]  # claim UID -> DRA_MEMS_<uid>
    inside: tuple[CPUSet, CPUSet]  # Cpus_allowed_list, Mems_allowed_list of a new process in the container
    init: tuple[CPUSet, CPUSet]  # the same of the container's first process, from the host's /proc
    cgroup: tuple[CPUSet, CPUSet]  # cpuset.cpus, cpuset.mems of its cgroup on the host


def _by_claim(env: Mapping[str, str], prefix: str) -> dict[str, CPUSet]:
    """Claim UID -> the CPU list of the variables named `prefix`<uid>. Each also comes as a shell-readable twin with
    the UID's dashes as underscores, which must say the same."""
    named = {k.removeprefix(prefix): CPUSet.parse(v) for k, v in env.items() if k.startswith(prefix)}
    by_uid = {uid: cpus for uid, cpus in named.items() if "-" in uid}
    for uid, cpus in by_uid.items():
        twin = uid.replace("-", "_")
        assert named.get(twin) == cpus, f"{prefix}{twin}={named.get(twin)} disagrees with {prefix}{uid}={cpus}"
    assert len(named) == 2 * len(by_uid), f"{prefix}* without a twin: {sorted(named)}"
    return by_uid


@dataclass
class RealNode(KubeletNode):
    plane: ControlPlane
    dir: Path = Path()
    """The kubelet's files: config, credentials, root folder (`root`), log; short, for socket paths. A new folder
    below /tmp unless given."""
    feature_gates: Mapping[str, bool] = field(default_factory=dict)
    """The kubelet's; when empty, the control plane's (less those the kubelet does not know)."""
    name: str = NODE_NAME
    vmodule: str = ""
    """The kubelet's --vmodule (e.g. dra_plugin=4 logs each NodePrepareResources call with its time)."""
    port: int = 0
    bridge: str = ""
    _kubelet: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    runtime: Containerd = field(init=False)
    """The node's containerd; its cgroup parent is the kubelet's cgroupRoot (pods are below <it>/kubepods)."""
    root: Path = field(init=False)
    """The kubelet's --root-dir (the chart's kubeletRootDir)."""
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.dir == Path():
            self.dir = Path(tempfile.mkdtemp(prefix="dra-kl-", dir="/tmp"))
        self.runtime = Containerd(newest_2x())
        self.root = self.dir / "root"
        self.log = self.dir / "kubelet.log"

    @property
    def cdi_dir(self) -> Path:
        return self.runtime.cdi_dir

    # ------------------------------------------------------------------------------------------------------------
    # Starting and stopping.

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("a real node needs root")
        if shutil.which("unshare") is None or not CNI_BRIDGE.exists():
            raise Unavailable("the real node needs unshare and containernetworking-plugins (hack/install-testenv.sh)")
        if not self.feature_gates:
            self.feature_gates = kubelet_gates(self.plane)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.runtime.start()
        # hack/examples' image name for the test busybox image (containerd.sh imported it).
        self.runtime.ctr("images", "tag", "--force", "localhost/busybox:latest", EXAMPLE_IMAGE)
        self._cni()
        self._cgroup_root()
        self._kubelet_files()
        self._share_root()
        self.start_kubelet()
        self.wait_ready()

    def stop_parts(self) -> None:
        """Stops the kubelet and containerd, and removes every mount, cgroup, interface and file the node made."""
        try:
            self.stop_kubelet()
            self.runtime.stop()
        finally:
            self._unmount_all()
            if self.bridge:
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
            shutil.rmtree(self.dir, ignore_errors=True)

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
        (self.runtime.cni_dir / "10-dra-cpu-test.conflist").write_text(json.dumps(conflist, indent=2))

    def _cgroup_root(self) -> None:
        """The kubelet requires its cgroupRoot to exist in every hierarchy; a v1 cpuset starts empty."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if not (hierarchy / "cgroup.procs").exists():
                continue
            path = hierarchy / self.runtime.cgroup_parent.lstrip("/")
            path.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (path / name).exists() and not (path / name).read_text().strip():
                    (path / name).write_text((hierarchy / name).read_text())

    def _kubelet_files(self) -> None:
        """The kubelet's credentials, configuration, and the kernel settings it is shown instead of the host's."""
        user = self.plane.pki.node_user(self.name, f"kubelet-{self.dir.name}")
        write_kubeconfig(self.dir / "kubelet.kubeconfig", self.plane.url, self.plane.pki.ca, user)
        self.port = free_port()
        config = kubelet_configuration(
            self.plane,
            port=self.port,
            cri_socket=str(self.runtime.cri_socket),
            cgroup_root=self.runtime.cgroup_parent,
            pod_logs_dir=str(self.dir / "pod-logs"),
            feature_gates=self.feature_gates,
        )
        (self.dir / "kubelet.yaml").write_text(json.dumps(config, indent=2) + "\n")
        (self.dir / "sysctl").mkdir(exist_ok=True)
        for name, value in KERNEL_TUNABLES.items():
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
        self._kubelet = spawn(self.kubelet_command(), self.log, env={**os.environ, "PATH": KUBELET_PATH})

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        if self._kubelet is not None:
            stop_group(self._kubelet, sig, grace=20)
            self._kubelet = None

    def restart_kubelet(self) -> None:
        self.stop_kubelet()
        self.start_kubelet()
        self.wait_ready()

    def kubelet_exited(self) -> str:
        if self._kubelet is None or self._kubelet.poll() is not None:
            return f"the kubelet exited ({None if self._kubelet is None else self._kubelet.returncode})"
        return ""

    def kubelet_log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)

    def plugin_watcher_ready(self) -> bool:
        # The plugin watcher's folder, which the driver's DaemonSet mounts (type Directory), comes a moment after
        # the Node is Ready.
        return (self.root / "plugins_registry").is_dir()

    def keep_logs(self) -> Path:
        """The kubelet's log, copied to a new folder that outlives the node."""
        keep = Path(tempfile.mkdtemp(prefix="dra-cpu-kubelet-log-"))
        shutil.copy(self.log, keep / "kubelet.log")
        return keep

    # ------------------------------------------------------------------------------------------------------------
    # The driver on this node, as the chart installs it (tests/harness/cluster/chart.py).

    def chart_values(self, metrics_port: int) -> dict[str, Any]:
        """The chart's values for this node: its folders and sockets, the API server on the node's loopback."""
        return chart_values(
            node_name=self.name,
            api_server_port=self.plane.port,
            metrics_port=metrics_port,
            kubelet_root_dir=str(self.root),
            cdi_root=str(self.cdi_dir),
            nri_socket=str(self.runtime.nri_socket),
            state_dir=str(self.dir / "dra-cpu-state"),
        )

    def import_image(self, archive: Path) -> None:
        """An OCI archive into containerd's k8s.io namespace, where the kubelet finds images."""
        self.runtime.ctr("images", "import", str(archive))

    # ------------------------------------------------------------------------------------------------------------
    # Looking into containers.

    def exec(self, cid: str, cmd: list[str]) -> str:
        """Runs `cmd` in a container (CRI ExecSync) and returns its stdout; a non-zero exit raises CriError."""
        return self.runtime.cri.exec_sync(cid, cmd).stdout

    def allowed_inside(self, cid: str) -> Allowed:
        """Cpus_allowed_list and Mems_allowed_list of a new process in the container."""
        return self.runtime.cri.allowed_inside(cid)

    def container_info(self, cid: str) -> dict[str, Any]:
        """The runtime's verbose container info (pid, the OCI runtime spec, ...)."""
        return self.runtime.cri.info(cid)

    def host_cgroup(self, cid: str, controller: str, pod: bool = False) -> Path:
        """The folder of the container's cgroup (or, with `pod`, of its pod's) for `controller`, on the host: the
        controller's v1 hierarchy here, the unified one on a cgroup v2 host."""
        info = self.container_info(cid)
        path = Path(str(info["runtimeSpec"]["linux"]["cgroupsPath"]).lstrip("/"))
        for base in (Path("/sys/fs/cgroup") / controller, Path("/sys/fs/cgroup")):
            folder = base / path
            if (folder / "cgroup.procs").exists() and any(folder.glob(f"{controller}.*")):
                return folder.parent if pod else folder
        raise CriError(f"no {controller} cgroup for {cid[:12]} at {path}")

    def host_cpuset(self, cid: str) -> tuple[str, str]:
        """cpuset.cpus and cpuset.mems of the container's cgroup, read on the host (cgroup v1 here, v2 elsewhere)."""
        folder = self.host_cgroup(cid, "cpuset")
        cpus = (folder / "cpuset.cpus").read_text().strip()
        mems = (folder / "cpuset.mems").read_text().strip()
        if not cpus and (folder / "cpuset.cpus.effective").exists():  # v2: empty means the parent's
            cpus = (folder / "cpuset.cpus.effective").read_text().strip()
        return cpus, mems

    def host_cpu_quota(self, cid: str) -> Fraction | None:
        """The container's CFS quota in CPUs as its cgroup has it (v1 cpu.cfs_quota_us / cpu.cfs_period_us, v2
        cpu.max), None for none."""
        folder = self.host_cgroup(cid, "cpu")
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota, period = ((folder / f"cpu.cfs_{f}_us").read_text().strip() for f in ("quota", "period"))
        return None if quota in ("max", "-1") else Fraction(int(quota), int(period))

    def host_pod_cpu_shares(self, cid: str) -> int:
        """The CPU weight of the container's pod cgroup, as the kubelet's shares (v1 cpu.shares; v2 cpu.weight, which
        the kubelet derives from the shares, converted back)."""
        folder = self.host_cgroup(cid, "cpu", pod=True)
        if (folder / "cpu.weight").exists():
            weight = int((folder / "cpu.weight").read_text())
            return round(2 + (weight - 1) * 262142 / 9999)
        return int((folder / "cpu.shares").read_text())

    def pinning(self, pod: Mapping[str, Any], container: str | None = None) -> Pinning:
        """The CPUs and memory nodes of a pod's container (the first, or the one named `container`)."""
        cid = container_id(pod, container)
        env = dict(line.split("=", 1) for line in self.exec(cid, ["env"]).splitlines() if "=" in line)
        claimed = _by_claim(env, ENV_CPUSET)
        mems = _by_claim(env, ENV_MEMS)
        inside = self.allowed_inside(cid)
        init = Allowed.of_pid(int(self.container_info(cid)["pid"]))
        cpus, mems_text = self.host_cpuset(cid)
        return Pinning(
            claimed,
            mems,
            (inside.cpus, inside.mems),
            (init.cpus, init.mems),
            (CPUSet.parse(cpus), CPUSet.parse(mems_text)),
        )

    def wait_cpus(self, pod: Mapping[str, Any], want: CPUSet, what: str, timeout: float = 30.0) -> Pinning:
        """The container's pinning once a new process in it, its first process and its cgroup all have `want`."""

        def pinned() -> Pinning | NotYet:
            seen = self.pinning(pod)
            return seen if seen.inside[0] == want and seen.init[0] == want and seen.cgroup[0] == want else NotYet(seen)

        return wait_until(pinned, f"{what}: CPUs {want}", timeout, 0.3)
