"""The guest stand-in node: a Kubernetes node inside the multi-NUMA guest (tests/harness/guest), driven from the
host. containerd (hack/testenv/containerd.sh, unchanged, in the guest) on pure cgroup v2, the driver as
`python3 -m dra_cpu run --standalone DIR --enforcement nri`, and the kubelet's part played by the guest's agent
(tests/harness/guest/inside/kubelet_calls.py: CRI calls, plugin registration, NodePrepareResources).

    node = GuestStandinNode(guest, VERSIONS[0], "/var/lib/dra-guest/node")
    with node:
        pod = node.run_pod("p")

Everything a test asserts is read from the guest kernel: /proc/<pid>/status, /proc/<pid>/numa_maps, the container's
cgroup files under /sys/fs/cgroup, sysfs. Starting one takes about 35 s in a booted guest (TCG).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from dra_cpu.core.cdi_spec import spec_filename
from dra_cpu.core.claims import allocated_claim_object
from dra_cpu.core.cpuset import CPUSet
from tests.harness.claims import result as claim_result
from tests.harness.component import Component
from tests.harness.guest.vm import ROOT, Guest, GuestError
from tests.harness.poll import NotYet, wait_until
from tests.harness.runtimes.cri import Allowed, Container, Pod

DRIVER = "dra.cpu"
NODE = "dra-guest"
CONTAINERD = ROOT / "hack" / "testenv" / "containerd.sh"
VERSIONS = subprocess.run(
    ["bash", str(CONTAINERD), "versions"], check=True, capture_output=True, text=True
).stdout.split()
"""The containerd versions the guest was built with (hack/testenv/guest.sh copies what containerd.sh installed)."""
GUEST_INTERVAL = 0.2
"""How often a wait polls the guest: each check is a round trip to the guest agent, and the guest is slower."""


def cpulist(text: str) -> frozenset[int]:
    """A kernel cpu list ("0-3,6") as a set of ints, to compare with set literals and SPEC's CPU lists."""
    return CPUSet.parse(text).ids


def format_cpulist(cpus: Iterable[int]) -> str:
    """The kernel cpu list of `cpus`, as the driver writes DRA_CPUSET_*."""
    return str(CPUSet.of(cpus))


@dataclass(frozen=True)
class Claim:
    namespace: str
    name: str
    uid: str

    def ref(self) -> dict[str, str]:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid}


GUEST_USR = {"container_path": "/guest-usr", "host_path": "/usr", "readonly": True}
"""Mount the guest's /usr into a busybox container, for `container_python`."""
PYTHON_ENV = {"PYTHONHOME": "/guest-usr"}


def container_python(code: str, *args: str) -> list[str]:
    """A command running the guest's python3 inside a busybox container that has GUEST_USR mounted and PYTHON_ENV
    set: the dynamic loader is called by path, since the container has no /lib64. The process stays the
    container's, in its cgroup, under its cpuset and hugetlb limits."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"  # the guest's: the fixture checked they agree
    lib = "/guest-usr/lib/x86_64-linux-gnu"
    return [f"{lib}/ld-linux-x86-64.so.2", "--library-path", lib, f"/guest-usr/bin/python{version}", "-c", code, *args]


def pages_by_node(numa_maps: str, huge: bool = False) -> dict[int, int]:
    """Pages per NUMA node of a process's anonymous mappings (or, with `huge`, its hugetlb mappings), from
    /proc/<pid>/numa_maps. File-backed pages are left out: the page cache is shared and lands where it was read."""
    pages: dict[int, int] = {}
    for line in numa_maps.splitlines():
        words = line.split()
        if huge != ("huge" in words):
            continue
        # An anonymous hugetlb mapping shows as file=/anon_hugepage (deleted); other files are the page cache.
        if not huge and (any(w.startswith("file=") for w in words) or not any(w.startswith("anon=") for w in words)):
            continue
        for word in words:
            if word.startswith("N") and "=" in word:
                node, count = word[1:].split("=")
                pages[int(node)] = pages.get(int(node), 0) + int(count)
    return pages


result = functools.partial(claim_result, pool=NODE)
"""One allocation result for a device of the guest's node, as the scheduler writes it into a claim's status."""


@dataclass
class GuestStandinNode(Component):
    guest: Guest
    version: str
    dir: str
    """All of this node's state in the guest: containerd's (DIR/containerd), the driver's, the cluster folder."""
    metrics_port: int = 9400
    cgroup_parent: str = ""
    driver_pid: int = 0
    claims: list[Claim] = field(default_factory=list)
    _pids: dict[str, int] = field(default_factory=dict)
    # Below `dir`: containerd's state, sockets and CDI specs; the stand-in cluster folder; the kubelet's root folder
    # (a real kubelet's, or where the driver puts its sockets for the stand-in), with the driver's registration socket
    # where a kubelet's plugin watcher looks; the driver's state (its checkpoint) and log.
    containerd_dir: str = field(init=False)
    cri_socket: str = field(init=False)
    cdi_dir: str = field(init=False)
    cluster: str = field(init=False)
    kubelet_dir: str = field(init=False)
    registration: str = field(init=False)
    state_dir: str = field(init=False)
    driver_log: str = field(init=False)

    def __post_init__(self) -> None:
        self.containerd_dir = f"{self.dir}/containerd"
        self.cri_socket = f"{self.containerd_dir}/containerd.sock"
        self.cdi_dir = f"{self.containerd_dir}/cdi"
        self.cluster = f"{self.dir}/cluster"
        self.kubelet_dir = f"{self.dir}/kubelet"
        self.registration = f"{self.kubelet_dir}/plugins_registry/{DRIVER}-reg.sock"
        self.state_dir = f"{self.dir}/state"
        self.driver_log = f"{self.dir}/driver.log"

    def call(self, function: str, **kwargs: Any) -> Any:
        try:
            return self.guest.request("call", module="kubelet_calls", function=function, kwargs=kwargs)["result"]
        except GuestError as err:
            # A CRI call that times out says nothing of why: what containerd and the driver logged last does.
            raise GuestError(f"{err}\n{self.log_tails()}") from None

    def log_tails(self, lines: int = 30) -> str:
        tails = []
        for name, path in (("containerd", f"{self.containerd_dir}/containerd.log"), ("driver", self.driver_log)):
            tail = self.guest.run(["tail", "-n", str(lines), path], check=False)
            tails.append(f"--- {name} ({path}):\n{tail.stdout}{tail.stderr}")
        return "\n".join(tails)

    # containerd and the driver.
    def start(self) -> None:
        """containerd, then the driver against the stand-in folder, registered with the stand-in kubelet."""
        self.start_containerd()
        self.start_driver()

    def stop(self) -> None:
        """The driver (which must exit 0 on SIGTERM), then containerd."""
        try:
            rc = self.stop_driver()
            assert rc == 0, f"dra-cpu run exited {rc} on SIGTERM:\n{self.log_tail()}"
        finally:
            if self.cgroup_parent:
                self.stop_containerd()

    def start_containerd(self) -> None:
        self.guest.run(["bash", str(CONTAINERD), "start", self.version, self.containerd_dir], timeout=120)
        self.cgroup_parent = self.guest.read(f"{self.containerd_dir}/cgroup-parent").strip()
        self.call("cri_version", socket=self.cri_socket)

    def stop_containerd(self) -> None:
        self.call("close", socket=self.cri_socket)
        self.guest.run(["bash", str(CONTAINERD), "stop", self.version, self.containerd_dir], timeout=120)

    def start_driver(
        self, *extra: str, kubeconfig: str = "", node_name: str = NODE, register_seconds: int = 60
    ) -> None:
        """`dra-cpu run` with NRI enforcement; returns once it has registered with the stand-in kubelet. With
        `kubeconfig`, against that API server instead of the stand-in folder, for a real kubelet (guest_kubelet.py):
        returns once its registration socket is there for the kubelet to find. Fails after `register_seconds`."""
        argv = [
            # faulthandler: a daemon that hangs is sent SIGABRT and its threads' stacks land in its log.
            "python3", "-X", "faulthandler", "-m", "dra_cpu", "run",
            *(["--kubeconfig", kubeconfig] if kubeconfig else ["--standalone", self.cluster]),
            "--node-name", node_name,
            "--enforcement", "nri",
            "--nri-socket", f"{self.containerd_dir}/nri/nri.sock",
            "--kubelet-root-dir", self.kubelet_dir,
            "--cdi-root", self.cdi_dir,
            "--state-dir", self.state_dir,
            "--metrics-address", f"127.0.0.1:{self.metrics_port}",
            "--hugepage-poll-seconds", "1",
            "--log-level", "debug",
            *extra,
        ]  # fmt: skip
        self.guest.run(["mkdir", "-p", self.state_dir, self.cluster])
        self.driver_pid = self.guest.spawn(argv, self.driver_log)
        # The registration socket appears once NRI has synchronized with containerd.
        waited = self.guest.run(
            f"for i in $(seq {register_seconds * 10}); do [ -S {self.registration} ] && exit 0; "
            f"kill -0 {self.driver_pid} || exit 3; "
            "sleep 0.1; done; exit 4",
            check=False,
            timeout=register_seconds * 2 + 60,  # the sleeps themselves run late on a loaded guest
        )
        if waited.rc != 0:
            raise GuestError(f"dra-cpu run did not register ({waited.rc}):\n{self.log_tail()}")
        if not kubeconfig:
            self.call("register", registration=self.registration)

    def stop_driver(self) -> int:
        """SIGTERM, as the kubelet stops a pod; returns the exit status."""
        if not self.driver_pid:
            return 0
        self.call("unregister", registration=self.registration)
        pid, self.driver_pid = self.driver_pid, 0
        self.guest.run(["kill", "-TERM", str(pid)])
        rc = self.guest.wait(pid, 60)
        if rc is None:
            self.guest.run(["kill", "-ABRT", str(pid)])
            self.guest.wait(pid, 30)
            raise AssertionError(f"dra-cpu run (pid {pid}) did not stop on SIGTERM:\n{self.log_tail(150)}")
        return rc

    def log_tail(self, lines: int = 40) -> str:
        return self.guest.run(["tail", f"-{lines}", self.driver_log], check=False).stdout

    def metric(self, name: str) -> float:
        text = self.call("http_get", url=f"http://127.0.0.1:{self.metrics_port}/metrics")
        values = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name]
        assert values, f"no metric {name}"
        return sum(values)

    # Pods and containers, through CRI as kubelet would.
    def run_pod(self, name: str, uid: str = "") -> Pod:
        pod = self.call("run_pod", socket=self.cri_socket, name=name, cgroup_parent=self.cgroup_parent, uid=uid)
        return Pod(**pod)

    def create_container(
        self,
        pod: Pod,
        name: str,
        *,
        claims: Sequence[Claim] = (),
        command: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        mounts: Sequence[Mapping[str, Any]] = (),
    ) -> Container:
        """A container with the CDI devices of `claims` (as the kubelet passes the prepared claims' devices)."""
        cdi = [device for claim in claims for device in self.cdi_ids(claim)]
        container_id = self.call(
            "create_container",
            socket=self.cri_socket,
            pod_id=pod.id,
            name=name,
            command=list(command),
            env=dict(env or {}),
            cdi_devices=cdi,
            mounts=[dict(m) for m in mounts],
        )
        return Container(container_id, name, pod)

    def exec(self, container: Container, cmd: Sequence[str], timeout: int = 60) -> dict[str, Any]:
        reply: dict[str, Any] = self.call(
            "exec_sync", socket=self.cri_socket, container_id=container.id, cmd=list(cmd), timeout=timeout
        )
        return reply

    def remove_pod(self, pod: Pod) -> None:
        self.call("remove_pod", socket=self.cri_socket, pod_id=pod.id)

    def update_resources(self, container: Container, cpuset_cpus: str = "", cpuset_mems: str = "") -> None:
        self.call(
            "update_resources",
            socket=self.cri_socket,
            container_id=container.id,
            cpuset_cpus=cpuset_cpus,
            cpuset_mems=cpuset_mems,
        )

    def pid(self, container: Container | str) -> int:
        """The guest pid of the container's first process (it keeps it while it runs); `container` may be the id of
        one that another client made (the guest's real kubelet, guest_kubelet.py)."""
        cid = container if isinstance(container, str) else container.id
        if cid not in self._pids:
            self._pids[cid] = self.call("container_pid", socket=self.cri_socket, container_id=cid)
        return self._pids[cid]

    # Claims, as the scheduler leaves them, and the kubelet's prepare.
    def claim(self, results: list[dict[str, Any]], pod_uids: Sequence[str], name: str = "") -> Claim:
        claim = Claim("default", name or f"claim-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
        obj = allocated_claim_object(claim.namespace, claim.name, results, uid=claim.uid, pod_uids=pod_uids)
        directory = f"{self.cluster}/resourceclaims/{claim.namespace}"
        self.guest.run(["mkdir", "-p", directory])
        self.guest.write(f"{directory}/{claim.name}.yaml", yaml.safe_dump(obj))
        return claim

    def prepare(self, claim: Claim) -> dict[str, Any]:
        """NodePrepareResources for one claim; its response (error, devices)."""
        response: dict[str, Any] = self.call("prepare", registration=self.registration, claims=[claim.ref()])[claim.uid]
        if not response["error"]:
            self.claims.append(claim)
        return response

    def prepared(self, results: list[dict[str, Any]], pod_uids: Sequence[str]) -> Claim:
        """A claim written and prepared; fails if the driver refuses it."""
        claim = self.claim(results, pod_uids)
        response = self.prepare(claim)
        assert not response["error"], response["error"]
        return claim

    def unprepare(self, claim: Claim) -> str:
        error: str = self.call("unprepare", registration=self.registration, claims=[claim.ref()])[claim.uid]
        if not error and claim in self.claims:
            self.claims.remove(claim)
        return error

    def cdi_spec(self, claim: Claim) -> dict[str, Any]:
        """The claim's own CDI spec (its device metadata has a spec of its own beside it)."""
        spec: dict[str, Any] = json.loads(self.guest.read(f"{self.cdi_dir}/{spec_filename(DRIVER, claim.uid)}"))
        return spec

    def cdi_ids(self, claim: Claim) -> list[str]:
        spec = self.cdi_spec(claim)
        return [f"{spec['kind']}={device['name']}" for device in spec["devices"]]

    def env(self, claim: Claim) -> dict[str, str]:
        """The environment the claim's CDI device gives its containers."""
        spec = self.cdi_spec(claim)
        return dict(e.split("=", 1) for d in spec["devices"] for e in d["containerEdits"].get("env", []))

    def granted(self, claim: Claim) -> frozenset[int]:
        return cpulist(self.env(claim)[f"DRA_CPUSET_{claim.uid}"])

    # What the guest kernel says.
    def online(self) -> frozenset[int]:
        return cpulist(self.guest.read("/sys/devices/system/cpu/online"))

    def isolated(self) -> frozenset[int]:
        return cpulist(self.guest.read("/sys/devices/system/cpu/isolated"))

    def shared(self) -> frozenset[int]:
        """Where containers without claims run: online, not isolated, not claimed."""
        claimed: set[int] = set()
        for claim in self.claims:
            claimed |= self.granted(claim) if f"DRA_CPUSET_{claim.uid}" in self.env(claim) else set()
        return self.online() - self.isolated() - claimed

    def allowed(self, container: Container | str) -> Allowed:
        """Of the container's first process, from the guest's /proc."""
        return Allowed.parse(self.guest.read(f"/proc/{self.pid(container)}/status"))

    def allowed_inside(self, container: Container) -> Allowed:
        """Of a new process in the container, as it sees itself."""
        reply = self.exec(container, ["cat", "/proc/self/status"])
        assert reply["rc"] == 0, reply
        return Allowed.parse(reply["stdout"])

    def cgroup(self, container: Container | str) -> str:
        """The container's cgroup directory: cgroup2 alone is mounted on /sys/fs/cgroup in the guest."""
        lines = self.guest.read(f"/proc/{self.pid(container)}/cgroup").splitlines()
        assert lines and all(line.startswith("0::") for line in lines), f"not a pure cgroup v2 process: {lines}"
        return "/sys/fs/cgroup" + lines[0].removeprefix("0::")

    def cgroup_file(self, container: Container | str, name: str) -> str:
        return self.guest.read(f"{self.cgroup(container)}/{name}").strip()

    def assert_allowed(
        self, container: Container, cpus: Iterable[int], mems: Iterable[int] | None = None, timeout: float = 60.0
    ) -> None:
        """Inside, on the guest's /proc and in the container's cgroup, eventually: exactly `cpus` (and `mems`)."""
        want_cpus, want_mems = CPUSet.of(cpus), None if mems is None else CPUSet.of(mems)

        def check() -> bool | NotYet:
            inside, outside = self.allowed_inside(container), self.allowed(container)
            cgroup_cpus = CPUSet.parse(self.cgroup_file(container, "cpuset.cpus.effective"))
            ok = inside.cpus == outside.cpus == cgroup_cpus == want_cpus
            if want_mems is not None:
                cgroup_mems = CPUSet.parse(self.cgroup_file(container, "cpuset.mems"))
                ok = ok and inside.mems == outside.mems == cgroup_mems == want_mems
            return True if ok else NotYet((inside, outside, str(cgroup_cpus)))

        wait_until(check, f"{container.name} on CPUs {want_cpus}", timeout, GUEST_INTERVAL)

    def assert_sidecar_shared_then_released(
        self, pod: Pod, claim: Claim, bystander: Container, general: frozenset[int]
    ) -> None:
        """The end of a claim's walk: a container of `pod` without the claim's device runs on `general` less the
        claim's CPUs; once the pod is removed and the claim unprepared, `bystander` has all of `general` again."""
        sidecar = self.create_container(pod, "sidecar")
        self.assert_allowed(sidecar, general - self.granted(claim))

        self.remove_pod(pod)
        assert self.unprepare(claim) == ""
        self.assert_allowed(bystander, general)

    def clean(self) -> None:
        """What a test left: its pods, then its claims (unprepared as the kubelet would after the pods)."""
        self.call("remove_pods", socket=self.cri_socket)
        self._pids.clear()
        for claim in list(self.claims):
            error = self.unprepare(claim)
            assert not error, error
        self.guest.run(["rm", "-rf", f"{self.cluster}/resourceclaims"])


def containerd_versions(guest: Guest) -> list[str]:
    return guest.run(["bash", str(CONTAINERD), "versions"]).stdout.split()
