"""The local cluster of `hack/cluster.sh` (docs/tour.md): the harness's pieces put together as a user's cluster, on
this machine.

    with LocalCluster(numa_guest=True) as cluster:
        print(cluster.plane.kubeconfig)

- the control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager with the controllers of a user's
  cluster), its admin kubeconfig at `ClusterFolder.kubeconfig`;
- the real node `127.0.0.1`: the kubelet and containerd on this machine;
- with `numa_guest`, the multi-NUMA qemu guest as node `127.0.0.2`, in the topology GUEST_SPEC;
- dra-cpu built from this checkout and installed by one `helm install` (one DaemonSet, a pod on each node), as
  docs/admin.md says for a cluster without a registry or kube-proxy: both nodes keep their folders by the same names
  (NodeFolders) and reach the API server at the name `kubernetes`, so one set of values fits both.

Everything lives below one folder (ClusterFolder: the control plane's state and logs, the node's folders, the guest's
console and disk overlay), so that a cluster outlives the command that started it (__main__.py keeps the pieces in a
supervisor process), and `leftovers` can tell what a cluster left behind on this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from tests.harness.cluster.chart import DriverImage, InstalledDriver
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.helm import Helm
from tests.harness.component import Component
from tests.harness.guest.vm import GuestSpec, NodeSpec
from tests.harness.nodes.guest_kubelet import GuestKubeletNode
from tests.harness.nodes.kubelet import API_NAME, KubeletNode
from tests.harness.nodes.real import RealNode
from tests.harness.processes import free_port
from tests.harness.typed import present

DEFAULT_FOLDER = Path("/var/lib/dra-cpu-cluster")
GUEST_SPEC = GuestSpec(
    sockets=2,
    cores=6,
    threads=2,
    nodes=(
        NodeSpec(0, tuple(range(0, 12)), 1536, 64),
        NodeSpec(1, tuple(range(12, 24)), 1536, 64),
        NodeSpec(2, (), 512, 8),
    ),
    isolated_cpus=(22, 23),
)
"""The guest node: 24 CPUs in 2 sockets of 6 SMT cores, a NUMA node each, and a memory-only node 2; 128 MiB of 2 MiB
pages on each CPU node (16 MiB on node 2); one core (CPUs 22 and 23) isolated. Sized for hack/examples as written:
claim-cpu-capacity-20 takes 10 CPUs of each node (node 0 has 11 to give, CPU 0 staying shared; node 1 has 10
outside isolcpus), claim-isolated-cpus the isolated pair. Booted, with its kubelet Ready, in 55 to 70 s under TCG
on the 2-core test machines."""

C = TypeVar("C", bound=Component)


@contextlib.contextmanager
def step(say: Callable[[str], None], what: str, every: float = 30.0) -> Iterator[None]:
    """Says `what` is under way, how long it has taken every `every` seconds, and how long it took (or that it
    failed)."""
    say(f"{what} ...")
    start = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(every):
            say(f"  ... {what}: {time.monotonic() - start:.0f} s so far")

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        yield
    except BaseException:
        say(f"{what}: failed after {time.monotonic() - start:.0f} s")
        raise
    finally:
        done.set()
        beating.join()
    say(f"{what}: done in {time.monotonic() - start:.0f} s")


@dataclass(frozen=True)
class ClusterFolder:
    """Where a local cluster keeps everything; and the names on this machine that derive from it."""

    path: Path = DEFAULT_FOLDER

    @property
    def control_plane(self) -> Path:
        return self.path / "control-plane"

    @property
    def kubeconfig(self) -> Path:
        """The cluster admin's (ControlPlane's)."""
        return self.control_plane / "admin.kubeconfig"

    @property
    def node(self) -> Path:
        """Each node's folder: on this machine for the real node, in the guest for the guest's (the same path)."""
        return self.path / "node"

    @property
    def guest(self) -> Path:
        return self.path / "guest"

    @property
    def bin(self) -> Path:
        """kubectl, helm and dra-cpu, for the user's PATH."""
        return self.path / "bin"

    @property
    def cgroup_parent(self) -> str:
        """The cgroup parent of the real node's containerd (hack/testenv/containerd.sh names it after its folder)."""
        folder = f"{PurePosixPath(self.node) / 'containerd'}\n"
        return f"/kubepods-dra-cpu-{hashlib.sha256(folder.encode()).hexdigest()[:12]}"

    @property
    def bridge(self) -> str:
        """The real node's CNI bridge (RealNode names it after containerd's cgroup parent)."""
        return f"dracpu{self.cgroup_parent.rsplit('-', 1)[-1][:8]}"


@dataclass
class LocalCluster(Component):
    """The control plane, the real node, the guest node with `numa_guest`, and dra-cpu on them by its chart, all in
    `folder`; `say` hears of each step."""

    folder: ClusterFolder = field(default_factory=ClusterFolder)
    numa_guest: bool = False
    guest_spec: GuestSpec = GUEST_SPEC
    say: Callable[[str], None] = print
    _plane: ControlPlane | None = field(default=None, repr=False)
    _real: RealNode | None = field(default=None, repr=False)
    _nodes: list[KubeletNode] = field(default_factory=list, repr=False)
    """Those started, to drain at stop."""
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def plane(self) -> ControlPlane:
        return present(self._plane, "the control plane (not started)")

    @property
    def real(self) -> RealNode:
        return present(self._real, "the real node (not started)")

    def _started(self, what: str, component: C) -> C:
        """`component` started, to be stopped by `stop()`."""
        with step(self.say, what):
            self._stack.enter_context(component)
        return component

    def start(self) -> None:
        folder = self.folder
        plane = self._plane = self._started(
            "the control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager)",
            ControlPlane(folder.control_plane),
        )
        self._real = self._started(
            "node 127.0.0.1: the kubelet and containerd on this machine", RealNode(plane, dir=folder.node)
        )
        self._nodes.append(self._real)
        more: tuple[GuestKubeletNode, ...] = ()
        if self.numa_guest:
            cpus, nodes = self.guest_spec.cpus, len(self.guest_spec.nodes)
            guest = GuestKubeletNode(plane, self.guest_spec, dir=str(folder.node), workdir=folder.guest)
            self._started(f"node 127.0.0.2: the NUMA guest ({cpus} CPUs, {nodes} NUMA nodes; qemu TCG, minutes)", guest)
            self._nodes.append(guest)
            more = (guest,)
        with step(self.say, "the driver's image: podman build of this checkout (minutes the first time)"):
            image = DriverImage()
            image.start()
        try:
            # Metrics on every address: the kubelet probes each node's pod at that node's address (127.0.0.1 on this
            # machine, 127.0.0.2 in the guest), and one set of values serves both.
            values = self.real.folders.chart_values(None, plane, free_port(), API_NAME, "")
            driver = InstalledDriver(self.real, Helm.installed(), image.archive, values, more_nodes=more)
            what = "its image imported into each node's containerd (minutes in the guest), helm install charts/dra-cpu"
            self._started(f"dra-cpu: {what}, its pod Ready on every node", driver)
        finally:
            image.stop()

    def stop(self) -> None:
        """Drains the nodes while the driver still runs (so that the kubelets unprepare every claim), then uninstalls
        the driver and stops the nodes and the control plane, the last started first."""
        with step(self.say, "stopping the cluster: the nodes drained, dra-cpu uninstalled, the nodes stopped"):
            try:
                # Cordoned first: a Deployment's pods, recreated, wait Pending instead of landing on the other node.
                for node in self._nodes:
                    node.cordon()
                for node in self._nodes:
                    node.drain(node.drain_seconds)
            finally:
                self._stack.close()


MEMBER_ENV = "DRA_CPU_CLUSTER_MEMBER"
"""Set to the cluster's folder in the supervisor's environment (__main__.py), so that every process the cluster
starts carries it (each inherits its environment): how `leftovers` knows them, and only them (a user's shell or
`tail -f` of the cluster's log names the folder too, and is not the cluster's)."""


@dataclass(frozen=True)
class Leftovers:
    """What of a cluster is on this machine besides its folder: its processes (MEMBER_ENV) and those in the real
    node's pod cgroups, mounts below the folder, those cgroups, the node's bridge."""

    processes: tuple[int, ...] = ()
    mounts: tuple[str, ...] = ()
    cgroups: tuple[Path, ...] = ()
    interfaces: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.processes or self.mounts or self.cgroups or self.interfaces)

    def __str__(self) -> str:
        parts = [
            *(f"process {pid} ({_cmdline(pid).replace(chr(10), ' ')[:100]})" for pid in self.processes),
            *(f"mount {m}" for m in self.mounts),
            *(f"cgroup {c}" for c in self.cgroups),
            *(f"interface {i}" for i in self.interfaces),
        ]
        return "; ".join(parts) or "nothing"


def leftovers(folder: ClusterFolder) -> Leftovers:
    """What is on this machine of the cluster in `folder` (this process aside): all of it while
    the cluster runs, nothing once it is down."""
    here, parent = str(folder.path), folder.cgroup_parent
    member = f"{MEMBER_ENV}={here}".encode()
    processes = tuple(
        pid for pid in _pids() if pid != os.getpid() and (member in _environ(pid) or _in_cgroup(pid, parent))
    )
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = tuple(p for p in (line.split()[4] for line in mountinfo) if p == here or p.startswith(here + "/"))
    roots = [Path("/sys/fs/cgroup"), *(p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir())]
    cgroups = tuple(root / parent.lstrip("/") for root in roots if (root / parent.lstrip("/")).is_dir())
    interfaces = tuple(name for name in (folder.bridge,) if Path(f"/sys/class/net/{name}").exists())
    return Leftovers(processes, mounts, cgroups, interfaces)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    """Its arguments, one a line."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""


def _in_cgroup(pid: int, parent: str) -> bool:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    return any(line.split(":", 2)[2].startswith(parent + "/") for line in lines)
