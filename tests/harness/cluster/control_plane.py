"""The real Kubernetes control plane (hack/testenv/kubernetes.sh's build) on loopback: etcd, kube-apiserver,
kube-scheduler and kube-controller-manager, each a process of its own with its log in the state folder.

    with ControlPlane(state_dir) as plane:
        kube = Kube(plane.admin())
        ...

The credentials are made with openssl (tests/harness/cluster/pki.py): TLS client certificates and kubeconfigs,
service-account signing keys. kube-apiserver runs `--authorization-mode=Node,RBAC` with NodeRestriction and
ValidatingAdmissionPolicy admission, and the DRA feature gates this Kubernetes knows (FEATURE_GATES).
kube-controller-manager runs the controllers of a user's cluster (CONTROLLERS): a Deployment, a Job or a DaemonSet
gets its pods, a pod's ResourceClaimTemplate its claim. No node lifecycle controller runs: a Node made by
`create_node` stays Ready without a kubelet, and the scheduler places pods on it.

`components` picks a part: APISERVER_ONLY is etcd and kube-apiserver (about 5 s to start; ALL about 15 s on two
busy cores). A component that does not start raises ControlPlaneError with its log's tail.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

from tests.harness.cluster.client import close_api_client, new_api_client, unparsed
from tests.harness.cluster.pki import Pki, PkiError, write_kubeconfig
from tests.harness.component import Component, Unavailable
from tests.harness.paths import TESTENV
from tests.harness.poll import wait_until
from tests.harness.processes import free_port, log_tail, spawn, stop_group

SCRIPT = TESTENV / "kubernetes.sh"

# What the tests exercise; gates a given Kubernetes does not list (GA and locked on, or not there yet) are left out.
FEATURE_GATES: Mapping[str, bool] = {
    "DRAConsumableCapacity": True,
    "DRAResourceClaimDeviceStatus": True,
    "ResourceHealthStatus": True,
    "DRANodeAllocatableResources": True,
    "DRAListTypeAttributes": True,
}
CONTROLLERS = (
    # Workloads: Deployments (through ReplicaSets), StatefulSets, DaemonSets, Jobs and CronJobs get their pods;
    # finished Jobs with a TTL go; PodDisruptionBudgets get their status (kubectl drain reads it).
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "job-controller",
    "cronjob-controller",
    "ttl-after-finished-controller",
    "disruption-controller",
    # A pod's claims from its ResourceClaimTemplates (and their deletion with it).
    "resourceclaim-controller",
    # Owner-based deletion, namespace deletion.
    "garbage-collector-controller",
    "namespace-controller",
    # The `default` ServiceAccount of each namespace, the token of Secrets of type
    # kubernetes.io/service-account-token (pods get theirs from the TokenRequest API, which kube-apiserver serves
    # itself), and the kube-root-ca.crt ConfigMap that service-account token volumes mount.
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    # The rules of the aggregated ClusterRoles admin, edit and view, which users are given.
    "clusterrole-aggregation-controller",
)
"""kube-controller-manager --controllers. Left out: the node lifecycle controller (Nodes made without a kubelet
would go NotReady and their pods evicted), pod garbage collection, endpoints and services (no kube-proxy here),
volumes, certificates and cloud controllers."""
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"
APISERVER_NAMES = (
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "10.0.0.1",
)
"""The names kube-apiserver's certificate carries (a guest reaches it as `kubernetes`)."""

ETCD, APISERVER, SCHEDULER, CONTROLLER_MANAGER = "etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager"
ALL = (ETCD, APISERVER, SCHEDULER, CONTROLLER_MANAGER)
APISERVER_ONLY = (ETCD, APISERVER)
START_SECONDS = 240.0
"""For each component to answer its health check: 2 busy cores are slow."""


class ControlPlaneError(Exception):
    """A component did not start; the message carries its log's tail."""


@dataclass(frozen=True)
class ApiServer:
    kubeconfig: Path  # admin (system:masters) client certificate, absolute paths
    url: str  # https://127.0.0.1:PORT
    state_dir: Path  # certificates, etcd data and one <component>.log per process
    feature_gates: Mapping[str, bool] = field(default_factory=dict)  # as passed to kube-apiserver


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path  # kube-apiserver, kube-scheduler, kube-controller-manager, kubelet, kubectl
    etcd: Path

    @classmethod
    def installed(cls) -> Binaries:
        """What hack/testenv/kubernetes.sh installed; Unavailable when it was not run."""
        found = [
            subprocess.run(["bash", str(SCRIPT), verb], capture_output=True, text=True, check=False)
            for verb in ("bin-dir", "etcd")
        ]
        if any(r.returncode != 0 for r in found):
            raise Unavailable("the Kubernetes control plane is not installed: run hack/testenv/kubernetes.sh install")
        return cls(Path(found[0].stdout.strip()), Path(found[1].stdout.strip()))

    def path(self, name: str) -> Path:
        return self.etcd if name == ETCD else self.bin_dir / name


@dataclass
class ControlPlane(Component):
    """`components` of the control plane, with their state (credentials, etcd's data, logs) in `state_dir`."""

    state_dir: Path
    components: Sequence[str] = ALL
    feature_gates: Mapping[str, bool] = field(default_factory=lambda: dict(FEATURE_GATES))
    url: str = ""
    """https://127.0.0.1:PORT, once kube-apiserver is started."""
    gates: dict[str, bool] = field(default_factory=dict)
    """What kube-apiserver was given: feature_gates less those this Kubernetes does not know."""
    _binaries: Binaries | None = field(default=None, repr=False)
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            self._binaries = Binaries.installed()
        return self._binaries

    @property
    def pki(self) -> Pki:
        return Pki(self.state_dir / "pki")

    @property
    def kubeconfig(self) -> Path:
        """The admin's (O=system:masters)."""
        return self.state_dir / "admin.kubeconfig"

    @property
    def port(self) -> int:
        """kube-apiserver's port on 127.0.0.1."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def apiserver(self) -> ApiServer:
        return ApiServer(self.kubeconfig, self.url, self.state_dir, dict(self.gates))

    def log(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def admin(self) -> client.ApiClient:
        """A new typed-client ApiClient as cluster admin; close it (close_api_client) when done."""
        return new_api_client(self.kubeconfig)

    def kubeconfig_for_token(self, token: str, name: str) -> Path:
        return write_kubeconfig(self.state_dir / f"{name}.kubeconfig", self.url, self.pki.ca, {"token": token})

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl of the same Kubernetes version against this server (admin unless `kubeconfig`)."""
        return subprocess.run(
            [str(self.binaries.path("kubectl")), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def known_gates(self, component: str) -> set[str]:
        """The feature gates `component --help` lists."""
        shown = subprocess.run(
            [str(self.binaries.path(component)), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        return set(re.findall(r"(?:kube:)?([A-Z][A-Za-z0-9]+)=true\|false", shown.stdout + shown.stderr))

    def metrics(self, name: str) -> str:
        """The Prometheus text of a running kube-scheduler's or kube-controller-manager's /metrics, read as the admin
        (the component asks the API server whether the caller may)."""
        context = _self_signed()
        context.load_cert_chain(self.pki.dir / "admin.crt", self.pki.dir / "admin.key")
        url = f"https://127.0.0.1:{_secure_port(self._processes[name])}/metrics"
        with urllib.request.urlopen(url, timeout=30, context=context) as response:
            return str(response.read().decode())

    # ------------------------------------------------------------------------------------------------------------
    # Starting and stopping.

    def start(self) -> None:
        wanted = set(self.components)
        self.binaries  # noqa: B018 -- Unavailable before anything is made
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._make_credentials()
        except PkiError as err:
            raise ControlPlaneError(str(err)) from None
        for attempt in range(3):
            try:
                etcd_url = ""
                if ETCD in wanted:
                    shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)
                    etcd_url = self._start_etcd()
                if APISERVER in wanted:
                    self._start_apiserver(etcd_url)
                if SCHEDULER in wanted:
                    self._start_component(SCHEDULER, [])
                if CONTROLLER_MANAGER in wanted:
                    self._start_controller_manager()
                return
            except ControlPlaneError as err:
                self.stop()
                # A port chosen free can be taken by another process before ours binds it: choose again.
                if "address already in use" not in str(err) or attempt == 2:
                    raise

    def stop(self) -> None:
        """Stops every component, the last started first (SIGTERM, then SIGKILL after 10 s)."""
        for name, proc in reversed(list(self._processes.items())):
            stop_group(proc)
            del self._processes[name]

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        self.log(name).unlink(missing_ok=True)
        self._processes[name] = spawn([str(self.binaries.path(name)), *args], self.log(name))

    def _wait(self, name: str, what: str, ready: Callable[[], bool]) -> None:
        """Until `ready()`; fails with the log's tail when `name` exits or START_SECONDS pass."""
        proc = self._processes[name]

        def exited() -> str:
            return "" if proc.poll() is None else f"{name} exited with {proc.returncode}"

        wait_until(
            ready,
            what,
            START_SECONDS,
            0.2,
            abort=exited,
            retry_on=(OSError, urllib.error.URLError, client.ApiException, ssl.SSLError),
            details=lambda: f"{self.log(name)}:\n{log_tail(self.log(name))}",
            error=ControlPlaneError,
        )

    def _make_credentials(self) -> None:
        pki = self.pki
        pki.create_ca()
        pki.issue("apiserver", "/CN=kube-apiserver", client=False, server_names=APISERVER_NAMES)
        pki.issue("admin", "/O=system:masters/CN=admin")
        pki.issue(SCHEDULER, "/CN=system:kube-scheduler")
        pki.issue(CONTROLLER_MANAGER, "/CN=system:kube-controller-manager")
        pki.issue("apiserver-kubelet-client", "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client")
        pki.key_pair("service-account")

    def _user_kubeconfig(self, name: str) -> Path:
        path = self.kubeconfig if name == "admin" else self.state_dir / f"{name}.kubeconfig"
        return write_kubeconfig(path, self.url, self.pki.ca, self.pki.client_user(name))

    def _start_etcd(self) -> str:
        url, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        # --unsafe-no-fsync: test data need not survive a power cut, and fsync dominates latency on shared disks.
        self._spawn(
            ETCD,
            [
                "--name", "test", "--data-dir", str(self.state_dir / "etcd"), "--unsafe-no-fsync",
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"test={peer}",
            ],
        )  # fmt: skip

        def healthy() -> bool:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return bool(json.load(response).get("health") == "true")

        self._wait(ETCD, f"etcd on {url}", healthy)
        return url

    def _gates_flag(self) -> str:
        if not self.gates:
            known = self.known_gates(APISERVER)
            self.gates = {k: v for k, v in self.feature_gates.items() if k in known}
        return "--feature-gates=" + ",".join(f"{k}={str(v).lower()}" for k, v in sorted(self.gates.items()))

    def _start_apiserver(self, etcd_url: str) -> None:
        self.url = f"https://127.0.0.1:{free_port()}"
        self._user_kubeconfig("admin")
        pki = self.pki.dir
        self._spawn(
            APISERVER,
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--tls-cert-file={pki}/apiserver.crt",
                f"--tls-private-key-file={pki}/apiserver.key",
                f"--client-ca-file={pki}/ca.crt",
                f"--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt",
                f"--kubelet-client-key={pki}/apiserver-kubelet-client.key",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki}/service-account.pub",
                f"--service-account-signing-key-file={pki}/service-account.key",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The `kubernetes` Service may not have a loopback endpoint: keep none.
                "--endpoint-reconciler-type=none",
                "--authorization-mode=Node,RBAC",
                # The defaults (ValidatingAdmissionPolicy among them) plus NodeRestriction, as clusters run it.
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                self._gates_flag(),
            ],
        )
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5, context=context) as response:
                return bool(response.status == 200)

        self._wait(APISERVER, f"kube-apiserver /readyz on {self.url}", ready)

    def _start_component(self, name: str, extra: Sequence[str]) -> None:
        """kube-scheduler or kube-controller-manager with its own credentials, until its /healthz answers."""
        kubeconfig = self._user_kubeconfig(name)
        port = free_port()
        self._spawn(
            name,
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.state_dir / (name + '-certs')}",
                "--leader-elect=false",
                "--v=2",
                self._gates_flag(),
                *extra,
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=5, context=_self_signed()) as r:
                return bool(r.status == 200)

        self._wait(name, f"{name} /healthz", healthy)

    def _start_controller_manager(self) -> None:
        pki = self.pki.dir
        self._start_component(
            CONTROLLER_MANAGER,
            [
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki}/service-account.key",
                f"--root-ca-file={pki}/ca.crt",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--controllers={','.join(CONTROLLERS)}",
            ],
        )
        api = self.admin()
        try:
            core = client.CoreV1Api(api)
            # The serviceaccount controller at work: pods cannot be created in a namespace before its `default` SA.
            self._wait(
                CONTROLLER_MANAGER,
                "the ServiceAccount default/default",
                lambda: (
                    unparsed(core.read_namespaced_service_account("default", "default", _preload_content=False)).status
                    == 200
                ),
            )
        finally:
            close_api_client(api)


def _secure_port(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    assert isinstance(args, list), args  # as spawn passes them
    return next(str(a).split("=", 1)[1] for a in args if str(a).startswith("--secure-port="))


def _self_signed() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a self-signed serving certificate the component made itself
    return context
