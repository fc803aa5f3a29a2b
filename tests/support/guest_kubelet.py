"""pytest plugin: the multi-NUMA test guest joined to the test control plane as a second node, `numa-guest`, with a
real kubelet: kube-scheduler allocates claims across the guest's NUMA nodes and the kubelet prepares them with
dra-cpu, on a kernel that has them.

    def test_x(guest_kubelet: GuestKubelet) -> None:
        pod = guest_kubelet.kube.get(...)

Fixture `guest_kubelet` (module scope) boots a guest of its own (tests/support/guest.py, `forwards` and `shares`):
the session's `guest` stays without network. How the node is put together:
- The guest has a NIC on qemu's user-mode network with restrict=on: it reaches the kube-apiserver's port and nothing
  else, at the name `kubernetes` (GUEST_HOST in its /etc/hosts; a name the server's certificate carries), and
  nothing reaches it. So the API server cannot reach this kubelet: no exec, logs or port-forward through the API;
  tests read the guest itself through its agent (the container's /proc/<pid>/status, the driver's files).
- The kubelet is hack/testenv/kubernetes.sh's, run from a read-only 9p share of its folder, with real_node.py's
  configuration (cgroupfs driver below containerd's cgroup parent, here on pure cgroup v2; cpuManagerPolicy none;
  the control plane's DRA gates) and credentials (a client certificate of system:node:numa-guest from the plane's
  PKI, which is shared read-only too). It sets the kernel's sysctls itself: the guest is throwaway.
- containerd 2.1 with NRI and CDI, started by guest_node.GuestNode as for the guest tests. Pods must use the host
  network (`hostNetwork: true`): the guest's kernel has no veth or bridge module loaded and no CNI plugins. A CNI
  configuration naming the loopback plugin is there only so that the runtime reports its network ready, which the
  Node's Ready condition needs; a pod of its own network fails at its sandbox.
- dra-cpu runs in the guest as `python3 -m dra_cpu run --kubeconfig ...` from the shared checkout (GuestNode's
  start_driver), NRI enforcement on, with a token of the chart's ServiceAccount bound to the Node: the API server
  puts the node's name into it as it does for a pod-bound token, so the chart's ValidatingAdmissionPolicy applies
  unchanged. The chart's RBAC, policy and DeviceClasses are applied from `helm template` (release RELEASE, a
  namespace of its own), not by helm install: the driver is not a pod here.

On these 2-core machines the guest boots in 10 to 40 s, and the kubelet takes a minute or more to get Ready under
TCG; START_SECONDS bounds each stage, and a failure carries the guest kubelet's and the driver's log tails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from dra_cpu.core.cpuset import CPUSet
from tests.harness.cluster.client import Kube, close_api_client, object_path
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.helm import CHART, Helm
from tests.harness.cluster.objects import DRIVER, DRIVER_ACCESS_KINDS, ensure, new_namespace
from tests.harness.cluster.pki import kubeconfig_text
from tests.harness.poll import wait_until
from tests.harness.runtimes.cri import Allowed
from tests.support import guest as guest_vm
from tests.support.guest import GUEST_ADDRESS, GUEST_HOST, Guest, GuestError
from tests.support.guest_node import VERSIONS, GuestNode
from tests.support.real_node import (
    NodeError,
    drain,
    kubelet_argv,
    kubelet_configuration,
    kubelet_gates,
    node_user,
    wait_node_ready,
)

NODE_NAME = "numa-guest"
RELEASE = "dra-cpu-guest"
"""The chart's objects for this node are rendered as this release: other modules helm-install `dra-cpu`."""
API_NAME = "kubernetes"
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
START_SECONDS = float(os.environ.get("DRA_CPU_GUEST_KUBELET_START_SECONDS", "300"))
"""For each of: the Node to get Ready, the driver to get ready."""


@dataclass
class GuestKubelet:
    plane: ControlPlane
    guest: Guest
    node: GuestNode
    """containerd and the driver in the guest; the kubelet's root folder is <node.dir>/kubelet."""
    kube: Kube
    kubelet_pid: int = 0
    driver_namespace: str = ""
    chart_objects: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds each stage of the start took, for the test report."""

    @property
    def name(self) -> str:
        return NODE_NAME

    @property
    def root(self) -> str:
        return f"{self.node.dir}/kubelet"

    @property
    def kubelet_log(self) -> str:
        return f"{self.node.dir}/kubelet.log"

    @property
    def state_dir(self) -> str:
        return f"{self.node.dir}/state"

    def kubelet_log_tail(self, lines: int = 40) -> str:
        return self.guest.run(["tail", f"-{lines}", self.kubelet_log], check=False).stdout

    def describe(self) -> str:
        """The guest kubelet's and the driver's log tails, for failure messages."""
        return (
            f"guest kubelet ({self.kubelet_log}):\n{self.kubelet_log_tail(30)}\n"
            f"dra-cpu ({self.node.driver_log}):\n{self.node.log_tail(20)}"
        )

    def keep_logs(self) -> Path:
        """The kubelet's, the driver's, containerd's and the console's logs, copied to a new host folder."""
        keep = Path(tempfile.mkdtemp(prefix="dra-cpu-guest-node-logs-"))
        for path in (self.kubelet_log, self.node.driver_log, f"{self.node.containerd_dir}/containerd.log"):
            found = self.guest.run(["cat", path], check=False)
            (keep / Path(path).name).write_text(found.stdout if found.rc == 0 else found.stderr)
        shutil.copy(self.guest.console, keep / "console.log")
        return keep

    # ------------------------------------------------------------------------------------------------------------
    # What the guest kernel and the driver's files say.

    def allowed(self, container_id: str) -> Allowed:
        """Cpus_allowed_list and Mems_allowed_list of the container's first process, from the guest's /proc."""
        return self.node.allowed(container_id)

    def cpuset(self, container_id: str) -> tuple[CPUSet, CPUSet]:
        """cpuset.cpus and cpuset.mems of the container's cgroup."""
        return CPUSet.parse(self.node.cgroup_file(container_id, "cpuset.cpus")), CPUSet.parse(
            self.node.cgroup_file(container_id, "cpuset.mems")
        )

    def checkpoint_claims(self) -> dict[str, dict[str, Any]]:
        """Claim UID -> record, from the driver's checkpoint in the guest."""
        found = self.guest.run(["cat", f"{self.state_dir}/checkpoint.json"], check=False)
        if found.rc != 0:
            return {}
        return {str(c["uid"]): c for c in json.loads(found.stdout).get("claims", [])}

    def set_online(self, cpu: int, online: bool) -> None:
        self.guest.write(f"/sys/devices/system/cpu/cpu{cpu}/online", "1" if online else "0")

    # ------------------------------------------------------------------------------------------------------------
    # Starting and stopping.

    def start(self, helm: Helm) -> None:
        start = time.monotonic()
        port = int(self.plane.url.rsplit(":", 1)[1])
        server = f"https://{API_NAME}:{port}"
        self.guest.run(f"echo '{GUEST_HOST} {API_NAME}' >>/etc/hosts")
        self._check_api(server)
        self._start_containerd()
        self._start_kubelet(server)
        self.timings["kubelet Ready"] = time.monotonic() - start
        start = time.monotonic()
        self._start_driver(server, helm)
        self.timings["dra-cpu ready"] = time.monotonic() - start

    def _check_api(self, server: str) -> None:
        """The API server answers through the forwarded port, over TLS with the plane's CA, at its name."""
        code = (
            "import ssl, sys, urllib.request\n"
            "context = ssl.create_default_context(cafile=sys.argv[2])\n"
            "print(urllib.request.urlopen(sys.argv[1] + '/readyz', timeout=30, context=context).read().decode())\n"
        )
        reached = self.guest.run(["python3", "-c", code, server, str(self.plane.pki.ca)], check=False, timeout=90)
        if reached.rc != 0:
            raise NodeError(f"the guest cannot reach the API server at {server}:\n{reached.stderr[-2000:]}")

    def _start_containerd(self) -> None:
        cni = f"{self.node.containerd_dir}/cni"
        self.guest.run(["mkdir", "-p", cni])
        # Loaded, never run: hostNetwork pods have no CNI calls (see the module).
        loopback = {"cniVersion": "1.0.0", "name": "dra-guest-lo", "plugins": [{"type": "loopback"}]}
        self.guest.write(f"{cni}/10-loopback.conflist", json.dumps(loopback))
        self.node.start_containerd()

    def _start_kubelet(self, server: str) -> None:
        directory = self.node.dir
        self.guest.run(["mkdir", "-p", self.root, f"/sys/fs/cgroup{self.node.cgroup_parent}"])
        user = node_user(self.plane, self.name, f"kubelet-{self.name}-{uuid.uuid4().hex[:8]}")
        self.guest.write(f"{directory}/kubelet.kubeconfig", kubeconfig_text(server, self.plane.pki.ca, user))
        config = kubelet_configuration(
            self.plane,
            port=10250,
            cri_socket=self.node.cri_socket,
            cgroup_root=self.node.cgroup_parent,
            pod_logs_dir=f"{directory}/pod-logs",
            feature_gates=kubelet_gates(self.plane),
        )
        self.guest.write(f"{directory}/kubelet.yaml", json.dumps(config, indent=2))
        argv = [
            *kubelet_argv(self.plane.binaries.path("kubelet"), Path(directory), Path(self.root), self.name),
            # Else the kubelet looks the node's name up, which nothing in the guest resolves.
            f"--node-ip={GUEST_ADDRESS}",
        ]
        self.kubelet_pid = self.guest.spawn(argv, self.kubelet_log)

        def exited() -> str:
            rc = self.guest.wait(self.kubelet_pid, 0)
            return "" if rc is None else f"the guest's kubelet exited ({rc})"

        wait_node_ready(
            self.kube,
            self.name,
            START_SECONDS,
            exited=exited,
            # The plugin watcher's folder: the driver registers there.
            also=lambda: self.guest.run(["test", "-d", f"{self.root}/plugins_registry"], check=False).rc == 0,
            log=lambda: f"guest kubelet log {self.kubelet_log}:\n{self.kubelet_log_tail()}",
        )

    def _start_driver(self, server: str, helm: Helm) -> None:
        kube = self.kube
        self.driver_namespace = new_namespace(kube, "dra-guest")
        rendered = helm.run("template", RELEASE, str(CHART), "--namespace", self.driver_namespace)
        if rendered.returncode != 0:
            raise NodeError(f"helm template failed:\n{rendered.stderr}")
        docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        self.chart_objects = [d for d in docs if d["kind"] in DRIVER_ACCESS_KINDS]
        # DeviceClasses are shared by every node of the cluster: kept when another test put them there.
        ensure(kube, [*self.chart_objects, *(d for d in docs if d["kind"] == "DeviceClass")], self.driver_namespace)
        [account] = [d["metadata"]["name"] for d in self.chart_objects if d["kind"] == "ServiceAccount"]
        node_uid = kube.get(f"/api/v1/nodes/{self.name}")["metadata"]["uid"]
        token_request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node_uid},
            },
        }
        path = f"/api/v1/namespaces/{self.driver_namespace}/serviceaccounts/{account}/token"
        token = kube.request("POST", path, token_request)["status"]["token"]
        kubeconfig = f"{self.node.dir}/driver.kubeconfig"
        self.guest.write(kubeconfig, kubeconfig_text(server, self.plane.pki.ca, {"token": token}))
        # Against an API server the daemon imports the Kubernetes client first: slower to start under TCG.
        self.node.start_driver(kubeconfig=kubeconfig, node_name=self.name, register_seconds=int(START_SECONDS))

        def ready() -> bool:
            try:
                self.node.call("http_get", url=f"http://127.0.0.1:{self.node.metrics_port}/readyz")
            except GuestError:
                return False
            return True

        def published() -> bool:
            return bool(kube.list(SLICES, field_selector=f"spec.nodeName={self.name},spec.driver={DRIVER}"))

        try:
            wait_until(ready, "dra-cpu in the guest to be ready (NRI, registered)", START_SECONDS, 2)
            # Ready comes before the first write of the slices, and stays so while writes fail.
            wait_until(published, f"ResourceSlices of {self.name}", START_SECONDS, 1)
        except AssertionError as err:
            raise NodeError(f"{err}\n{self.describe()}") from None

    def stop(self) -> None:
        """Deletes the node's pods (the kubelet unprepares their claims), stops the driver, the kubelet and
        containerd, and deletes the Node (its slices go with it) and the chart's objects."""
        kube = self.kube
        try:
            if self.kubelet_pid and self.guest.wait(self.kubelet_pid, 0) is None:
                drain(kube, self.name, timeout=120)
        finally:
            with contextlib.suppress(Exception):
                self.node.stop_driver()
            if self.kubelet_pid:
                with contextlib.suppress(GuestError):
                    self.guest.run(["kill", "-TERM", str(self.kubelet_pid)], check=False)
                    if self.guest.wait(self.kubelet_pid, 20) is None:
                        self.guest.run(["kill", "-KILL", str(self.kubelet_pid)], check=False)
                self.kubelet_pid = 0
            with contextlib.suppress(Exception):
                self.node.stop_containerd()
            # Without its Node (the control plane runs no node lifecycle controller to mark it NotReady), the
            # scheduler cannot place later pods on a node that is gone, and the garbage collector removes its slices.
            with contextlib.suppress(Exception):
                kube.delete(f"/api/v1/nodes/{self.name}")
            for obj in self.chart_objects:
                if obj["kind"] != "ServiceAccount":  # goes with its namespace
                    with contextlib.suppress(Exception):
                        kube.delete(object_path(obj, self.driver_namespace))
            if self.driver_namespace:
                with contextlib.suppress(Exception):
                    kube.delete(f"/api/v1/namespaces/{self.driver_namespace}")


@contextlib.contextmanager
def joined(plane: ControlPlane, helm: Helm, build: Path) -> Iterator[GuestKubelet]:
    """A guest booted with the API server's port forwarded and the kubelet and the plane's PKI shared, joined as
    NODE_NAME with dra-cpu running; everything is stopped and removed at the end. Raises NodeError
    or GuestError (with the logs) when it does not start."""
    port = int(plane.url.rsplit(":", 1)[1])
    shares = [plane.binaries.path("kubelet").parent, plane.pki.dir]
    start = time.monotonic()
    guest = guest_vm.boot(build, forwards=[port], shares=shares)
    api = plane.admin()
    node = GuestKubelet(plane, guest, GuestNode(guest, VERSIONS[0], f"/var/lib/dra-guest/{NODE_NAME}"), Kube(api))
    node.timings["guest booted"] = time.monotonic() - start
    try:
        node.start(helm)
        yield node
    finally:
        try:
            node.stop()
        finally:
            close_api_client(api)
            guest.poweroff()
            shutil.rmtree(guest.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def guest_kubelet(request: pytest.FixtureRequest, control_plane: ControlPlane, helm: Helm) -> Iterator[GuestKubelet]:
    """The test guest joined to `control_plane` as node numa-guest (see the module), for the tests of a module."""
    if os.geteuid() != 0:
        pytest.skip("the guest's node needs root (qemu's 9p shares of root-owned folders)")
    build, why = guest_vm.built()
    if build is None:
        pytest.skip(why)
    deb, why = guest_vm.kernel_package(build)
    if deb is None:
        pytest.skip(f"the guest's NIC driver cannot be loaded: {why}")
    failure = ""
    try:
        with joined(control_plane, helm, build) as node:
            request.config.stash[_JOINED] = node
            yield node
            if request.session.testsfailed:
                print(f"guest node logs kept in {node.keep_logs()}")
    except (NodeError, GuestError) as err:
        failure = str(err)
    if failure:
        pytest.fail(f"the guest did not join as a node: {failure}", pytrace=False)


_JOINED = pytest.StashKey[GuestKubelet]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    node = config.stash.get(_JOINED, None)
    if node is None:
        return
    terminalreporter.write_sep("-", "guest node")
    terminalreporter.write_line(", ".join(f"{what} in {seconds:.0f} s" for what, seconds in node.timings.items()))
