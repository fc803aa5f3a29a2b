"""pytest plugin: the real Kubernetes control plane (hack/testenv/kubernetes.sh) on loopback, for the whole test run.

    def test_x(control_plane: ControlPlane) -> None:
        api = control_plane.admin()
        create_node(api, "node-a", cpus=16, memory=64 << 30)

`control_plane` is etcd, kube-apiserver, kube-scheduler and kube-controller-manager, with TLS client certificates and
kubeconfigs made with openssl, service-account signing keys, `--authorization-mode=Node,RBAC`, admission with
ValidatingAdmissionPolicy, and the DRA feature gates this Kubernetes knows (FEATURE_GATES). The controller manager runs
the controllers a DRA test needs (CONTROLLERS): ResourceClaims from templates, garbage collection, DaemonSets,
service accounts and token Secrets, namespaces. No node lifecycle controller runs, so a Node made by `create_node`
stays Ready without a kubelet and the scheduler places pods on it.

Each process logs to <state_dir>/<name>.log; a component that does not start fails the test run with its log's tail.
Fixtures start further, independent planes with `started()`: e.g. a kube-apiserver alone (APISERVER_ONLY, what
tests/testenv_apiserver.py's `apiserver` is), or one with other feature gates.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes import client

from tests.support.paths import REPO

SCRIPT = REPO / "hack" / "testenv" / "kubernetes.sh"

# What the tests exercise; gates a given Kubernetes does not list (GA and locked on, or not there yet) are left out.
FEATURE_GATES: Mapping[str, bool] = {
    "DRAConsumableCapacity": True,
    "DRAResourceClaimDeviceStatus": True,
    "ResourceHealthStatus": True,
    "DRANodeAllocatableResources": True,
    "DRAListTypeAttributes": True,
}
# kube-controller-manager --controllers: claims from templates (resourceclaim), owner-based deletion, DaemonSets, the
# `default` ServiceAccount of each namespace, the token of Secrets of type kubernetes.io/service-account-token (pods
# get theirs from the TokenRequest API, which kube-apiserver serves itself), namespace deletion, and the
# kube-root-ca.crt ConfigMap that service-account token volumes mount.
CONTROLLERS = (
    "resourceclaim-controller",
    "garbage-collector-controller",
    "daemonset-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",
)
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"

ETCD, APISERVER, SCHEDULER, CONTROLLER_MANAGER = "etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager"
ALL = (ETCD, APISERVER, SCHEDULER, CONTROLLER_MANAGER)
APISERVER_ONLY = (ETCD, APISERVER)
START_SECONDS = float(os.environ.get("DRA_CPU_CONTROL_PLANE_START_SECONDS", "240"))  # 2 busy cores are slow


class ControlPlaneError(Exception):
    """A component did not start or stop; the message carries its log's tail."""


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
    def installed(cls) -> Binaries | None:
        """What hack/testenv/kubernetes.sh installed, or None when it was not run."""
        found = [
            subprocess.run(["bash", str(SCRIPT), verb], capture_output=True, text=True, check=False)
            for verb in ("bin-dir", "etcd")
        ]
        if any(r.returncode != 0 for r in found):
            return None
        return cls(Path(found[0].stdout.strip()), Path(found[1].stdout.strip()))

    def path(self, name: str) -> Path:
        return self.etcd if name == ETCD else self.bin_dir / name


def new_client(kubeconfig: Path) -> client.ApiClient:
    """A typed-client ApiClient for `kubeconfig`; close() it when done."""
    api: client.ApiClient = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    return api


def close(api: client.ApiClient) -> None:
    api.close()  # type: ignore[no-untyped-call]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Pki:
    """A CA and the certificates issued by it, all in `dir` (ECDSA P-256: quick to make)."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def create_ca(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=dra-cpu-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            cwd=self.dir,
        )

    def issue(self, name: str, subject: str, *, server_names: Sequence[str] = (), client: bool = True) -> None:
        """name.crt and name.key for `subject` (e.g. /O=system:masters/CN=admin): a client certificate, and a server
        certificate too when `server_names` (IPs and DNS names) are given."""
        usages = (["serverAuth"] if server_names else []) + (["clientAuth"] if client else [])
        extensions = [f"extendedKeyUsage={','.join(usages)}", "keyUsage=critical,digitalSignature"]
        if server_names:
            sans = [f"IP:{n}" if re.fullmatch(r"[0-9.]+|[0-9a-f:]+", n) else f"DNS:{n}" for n in server_names]
            extensions.append(f"subjectAltName={','.join(sans)}")
        (self.dir / f"{name}.ext").write_text("\n".join(extensions) + "\n")
        _openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=self.dir,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            str(int.from_bytes(os.urandom(8), "big")),
            "-days",
            "3650",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=self.dir,
        )
        (self.dir / f"{name}.csr").unlink()
        (self.dir / f"{name}.ext").unlink()

    def key_pair(self, name: str) -> None:
        """name.key (EC private key, PEM) and name.pub: service-account token signing."""
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=self.dir)
        _openssl("ec", "-in", f"{name}.key", "-pubout", "-out", f"{name}.pub", cwd=self.dir)


def kubeconfig_text(url: str, ca: Path, user: Mapping[str, str]) -> str:
    """A kubeconfig for `url` whose user is `user` (client-certificate/client-key, or token), as JSON (which is
    YAML)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": url, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": dict(user)}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    return json.dumps(config, indent=2) + "\n"


def write_kubeconfig(path: Path, url: str, ca: Path, user: Mapping[str, str]) -> Path:
    path.write_text(kubeconfig_text(url, ca, user))
    return path


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ kube-scheduler + kube-controller-manager) with state in `state_dir`."""

    state_dir: Path
    binaries: Binaries
    feature_gates: Mapping[str, bool] = field(default_factory=lambda: dict(FEATURE_GATES))
    # Flags added to a component's command line, by component name (benchmarks raise the clients' rate limits).
    extra_args: Mapping[str, Sequence[str]] = field(default_factory=dict)
    url: str = ""
    etcd_url: str = ""
    gates: dict[str, bool] = field(default_factory=dict)  # what was passed: feature_gates less the unknown ones
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def pki(self) -> Pki:
        return Pki(self.state_dir / "pki")

    @property
    def kubeconfig(self) -> Path:
        """The admin's (O=system:masters)."""
        return self.state_dir / "admin.kubeconfig"

    @property
    def apiserver(self) -> ApiServer:
        return ApiServer(self.kubeconfig, self.url, self.state_dir, dict(self.gates))

    def log(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def admin(self) -> client.ApiClient:
        """A new typed-client ApiClient as cluster admin; close it when done."""
        return new_client(self.kubeconfig)

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

    # ------------------------------------------------------------------------------------------------------------
    # Starting and stopping.

    def start(self, components: Iterable[str] = ALL) -> None:
        wanted = set(components)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._make_credentials()
        for attempt in range(3):
            try:
                if ETCD in wanted:
                    shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)
                    self.etcd_url = self._start_etcd()
                if APISERVER in wanted:
                    self._start_apiserver(self.etcd_url)
                if SCHEDULER in wanted:
                    self._start_scheduler()
                if CONTROLLER_MANAGER in wanted:
                    self._start_controller_manager()
                return
            except ControlPlaneError as err:
                self.stop()
                # A port chosen free can be taken by another process before ours binds it: choose again.
                if "address already in use" not in str(err) or attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Stops every component, the last started first (SIGTERM, then SIGKILL after 10 s)."""
        for name, proc in reversed(list(self._processes.items())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            del self._processes[name]

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        with self.log(name).open("wb") as out:
            proc = subprocess.Popen(
                [str(self.binaries.path(name)), *args, *self.extra_args.get(name, ())],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes[name] = proc
        return proc

    def _wait(self, name: str, what: str, ready: Any, timeout: float = START_SECONDS) -> None:
        """Polls `ready()` until it is true; fails with the log's tail when `name` exits or time runs out."""
        proc = self._processes[name]
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except (OSError, urllib.error.URLError, client.ApiException, ssl.SSLError):
                pass
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode} while waiting for {what}; {self.log(name)}:\n"
                    + log_tail(self.log(name))
                )
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out after {timeout:.0f} s waiting for {what}; {self.log(name)}:\n"
                    + log_tail(self.log(name))
                )
            time.sleep(0.2)

    def _make_credentials(self) -> None:
        pki = self.pki
        pki.create_ca()
        pki.issue(
            "apiserver",
            "/CN=kube-apiserver",
            client=False,
            server_names=[
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.0.0.1",
            ],
        )
        pki.issue("admin", "/O=system:masters/CN=admin")
        pki.issue("kube-scheduler", "/CN=system:kube-scheduler")
        pki.issue("kube-controller-manager", "/CN=system:kube-controller-manager")
        pki.issue("apiserver-kubelet-client", "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client")
        pki.key_pair("service-account")

    def _user_kubeconfig(self, name: str) -> Path:
        user = {
            "client-certificate": str(self.pki.dir / f"{name}.crt"),
            "client-key": str(self.pki.dir / f"{name}.key"),
        }
        path = self.kubeconfig if name == "admin" else self.state_dir / f"{name}.kubeconfig"
        return write_kubeconfig(path, self.url, self.pki.ca, user)

    def _start_etcd(self) -> str:
        client_port, peer_port = free_port(), free_port()
        url, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        # --unsafe-no-fsync: test data need not survive a power cut, and fsync dominates latency on shared disks.
        self._spawn(
            ETCD,
            [
                "--name",
                "test",
                "--data-dir",
                str(self.state_dir / "etcd"),
                "--unsafe-no-fsync",
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"test={peer}",
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return bool(json.load(response).get("health") == "true")

        self._wait(ETCD, f"etcd on {url}", healthy)
        return url

    def known_gates(self, component: str) -> set[str]:
        """The feature gates `component --help` lists."""
        shown = subprocess.run(
            [str(self.binaries.path(component)), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        return set(re.findall(r"(?:kube:)?([A-Z][A-Za-z0-9]+)=true\|false", shown.stdout + shown.stderr))

    def _gates_flag(self) -> str:
        if not self.gates:
            known = self.known_gates(APISERVER)
            self.gates = {k: v for k, v in self.feature_gates.items() if k in known}
        return "--feature-gates=" + ",".join(f"{k}={str(v).lower()}" for k, v in sorted(self.gates.items()))

    def _start_apiserver(self, etcd_url: str) -> None:
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        admin = self._user_kubeconfig("admin")
        pki = self.pki.dir
        self._spawn(
            APISERVER,
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
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
        assert admin.is_file()

    def _component_args(self, name: str) -> list[str]:
        kubeconfig = self._user_kubeconfig(name)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.state_dir / (name + '-certs')}",
            "--leader-elect=false",
            "--v=2",
            self._gates_flag(),
        ]

    def _healthz(self, name: str, args: Sequence[str]) -> None:
        port = _secure_port(args)

        def healthy() -> bool:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=5, context=_context()) as r:
                return bool(r.status == 200)

        self._wait(name, f"{name} /healthz", healthy)

    def metrics(self, name: str) -> str:
        """The Prometheus text of a running component's /metrics."""
        return self.read(name, "/metrics").decode()

    def read(self, name: str, path: str, timeout: float = 60) -> bytes:
        """GET `path` (e.g. /metrics, /debug/pprof/heap?gc=1&debug=1) of a running component as the admin: etcd's
        client URL, the API server's, or the secure port of kube-scheduler or kube-controller-manager (which ask the
        API server whether the caller may)."""
        context = _context()
        context.load_cert_chain(self.pki.dir / "admin.crt", self.pki.dir / "admin.key")
        if name in (ETCD, APISERVER):
            base = self.etcd_url if name == ETCD else self.url
        else:
            args = self._processes[name].args
            assert isinstance(args, list), args  # as _spawn passes them
            base = f"https://127.0.0.1:{_secure_port(args)}"
        with urllib.request.urlopen(base + path, timeout=timeout, context=context) as response:
            return bytes(response.read())

    def pid(self, name: str) -> int:
        return self._processes[name].pid

    def _start_scheduler(self) -> None:
        args = self._component_args(SCHEDULER)
        self._spawn(SCHEDULER, args)
        self._healthz(SCHEDULER, args)

    def _start_controller_manager(self) -> None:
        pki = self.pki.dir
        args = [
            *self._component_args(CONTROLLER_MANAGER),
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki}/service-account.key",
            f"--root-ca-file={pki}/ca.crt",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--controllers={','.join(CONTROLLERS)}",
        ]
        self._spawn(CONTROLLER_MANAGER, args)
        self._healthz(CONTROLLER_MANAGER, args)
        api = self.admin()
        try:
            core = client.CoreV1Api(api)
            # The serviceaccount controller at work: pods cannot be created in a namespace before its `default` SA.
            self._wait(
                CONTROLLER_MANAGER,
                "the ServiceAccount default/default",
                lambda: (
                    _status(core.read_namespaced_service_account("default", "default", _preload_content=False)) == 200
                ),
            )
        finally:
            close(api)


def _secure_port(args: Sequence[Any]) -> str:
    return next(str(a).split("=", 1)[1] for a in args if str(a).startswith("--secure-port="))


def _context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a self-signed serving certificate the component made itself
    return context


def _status(response: Any) -> int:
    """The HTTP status of a typed-client call made with _preload_content=False."""
    return int(response.status)


# ----------------------------------------------------------------------------------------------------------------
# Objects tests need before any kubelet runs.


def create_node(
    api: client.ApiClient,
    name: str,
    cpus: int,
    memory: int,
    hugepages: Mapping[str, int] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Creates a Node as a kubelet registers it, Ready, and returns it as stored: capacity and allocatable of `cpus`
    CPUs, `memory` bytes and `hugepages` (page size such as "2Mi" -> bytes), which a kubelet takes out of the
    allocatable memory. Nothing marks it NotReady later: the control plane runs no node lifecycle controller."""
    huge = {f"hugepages-{size}": str(amount) for size, amount in (hugepages or {}).items()}
    common = {"cpu": str(cpus), "pods": "110", "ephemeral-storage": str(100 << 30), **huge}
    capacity = {**common, "memory": str(memory)}
    allocatable = {**common, "memory": str(memory - sum((hugepages or {}).values()))}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **(labels or {}),
            },
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "made by the test",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
            ],
        },
    }
    core = client.CoreV1Api(api)
    node = client.V1Node.from_dict({k: v for k, v in obj.items() if k != "status"})
    assert node is not None
    core.create_node(node)
    # Status goes through its subresource, as the kubelet writes it.
    response: Any = core.patch_node_status(
        name, {"status": obj["status"]}, _content_type="application/merge-patch+json", _preload_content=False
    )
    stored: dict[str, Any] = json.loads(response.data)
    # The TaintNodesByCondition admission plugin gives a new Node the not-ready taint; the node lifecycle controller
    # would take it off once the Node is Ready. It does not run here, so do its part.
    taints = stored["spec"].get("taints", [])
    kept = [t for t in taints if t["key"] != "node.kubernetes.io/not-ready"]
    if kept != taints:
        response = core.patch_node(
            name,
            {"spec": {"taints": kept or None}},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )
        stored = json.loads(response.data)
    return stored


def delete_node(api: client.ApiClient, name: str) -> None:
    with contextlib.suppress(client.ApiException):
        client.CoreV1Api(api).delete_node(name, _preload_content=False)


def create_namespace(api: client.ApiClient, name: str) -> None:
    namespace = client.V1Namespace.from_dict({"metadata": {"name": name}})
    assert namespace is not None
    client.CoreV1Api(api).create_namespace(namespace)


# ----------------------------------------------------------------------------------------------------------------
# The fixture.


@contextlib.contextmanager
def running(
    state_dir: Path,
    components: Iterable[str] = APISERVER_ONLY,
    feature_gates: Mapping[str, bool] = FEATURE_GATES,
    extra_args: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[ControlPlane]:
    """A ControlPlane of `components` for the body of the `with`, outside pytest (benchmarks); raises
    ControlPlaneError when it is not installed or does not start."""
    binaries = Binaries.installed()
    if binaries is None:
        raise ControlPlaneError("the Kubernetes control plane is not installed: run hack/testenv/kubernetes.sh install")
    plane = ControlPlane(state_dir, binaries, dict(feature_gates), extra_args=dict(extra_args or {}))
    try:
        plane.start(components)
        yield plane
    finally:
        plane.stop()


@contextlib.contextmanager
def started(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    components: Iterable[str] = ALL,
    feature_gates: Mapping[str, bool] = FEATURE_GATES,
    name: str = "control-plane",
) -> Iterator[ControlPlane]:
    """A ControlPlane of `components` for the body of the `with`, for fixtures: skips when the binaries are not
    installed, fails with the failing component's log tail, and keeps the logs when a test failed."""
    binaries = Binaries.installed()
    if binaries is None:
        pytest.skip("the Kubernetes control plane is not installed: run hack/testenv/kubernetes.sh install")
    state_dir = tmp_path_factory.mktemp(name)
    plane = ControlPlane(state_dir, binaries, feature_gates=dict(feature_gates))
    try:
        failure = ""
        try:
            plane.start(components)
        except ControlPlaneError as err:
            failure = str(err)
        if failure:
            pytest.fail(f"{name}: Kubernetes did not start: {failure}", pytrace=False)
        yield plane
    finally:
        plane.stop()
        # Keep the logs of a run that failed; pytest's tmp dir retention removes them later.
        if request.session.testsfailed == 0:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-scheduler and kube-controller-manager for the whole test run."""
    with started(request, tmp_path_factory) as plane:
        yield plane
