"""Where the API server is and who we are to it: a kubeconfig file, or the pod's service account (in-cluster).

What the daemon and `status`/`explain --kubeconfig` need of client-go's loading rules: the current context's
cluster (server, CA file or data, insecure-skip-tls-verify, tls-server-name, proxy-url) and user (client certificate
and key as files or data, token, tokenFile, username/password). Relative paths are relative to the kubeconfig's
folder, as in kubectl. Tokens from a file (tokenFile, the in-cluster service-account token, which the kubelet
rotates) are read again every TOKEN_REREAD_SECONDS. A user with an `exec` credential plugin or an `auth-provider`
(cloud kubeconfigs) is loaded by the `kubernetes` package, imported only then.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dra_cpu.errors import DraCpuError
from dra_cpu.store.fileio import read_yaml

# client-go re-reads a token file at most once a minute (its cachingTokenSource).
TOKEN_REREAD_SECONDS = 60.0
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

Authorization = Callable[[], str | None]
"""The value of the Authorization header for the next request, or None for none."""


class KubeconfigError(DraCpuError):
    """The kubeconfig (or the in-cluster service account) cannot give a client configuration."""


@dataclass(frozen=True)
class Endpoint:
    """One API server and how to talk to it."""

    server: str  # scheme://host:port, as configured (for messages)
    host: str
    port: int
    tls: ssl.SSLContext | None  # None: plain http
    authorization: Authorization
    tls_server_name: str = ""  # the name to verify instead of `host`
    proxy: tuple[str, int] | None = None  # an HTTP proxy that tunnels (CONNECT) to the server


def _no_authorization() -> str | None:
    return None


class TokenFile:
    """A bearer token read from a file, again at most every TOKEN_REREAD_SECONDS: bound service-account tokens
    are rotated by the kubelet while the process runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._token = ""
        self._read_at = 0.0
        self._lock = threading.Lock()
        self._reread()

    def _reread(self) -> None:
        try:
            token = self.path.read_text().strip()
        except OSError as err:
            if not self._token:
                raise KubeconfigError(f"token file {self.path}: {err.strerror}") from None
            return  # keep the last token: the server says when it is no good
        self._token, self._read_at = token, time.monotonic()

    def __call__(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._read_at >= TOKEN_REREAD_SECONDS:
                self._reread()
            return f"Bearer {self._token}" if self._token else None


def in_cluster(environ: Mapping[str, str] = os.environ, account: Path = SERVICE_ACCOUNT) -> Endpoint:
    """The API server as a pod sees it: the kubernetes Service's address and the mounted service account."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeconfigError(
            "no --kubeconfig given and no in-cluster service account: "
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set (not running in a pod?)"
        )
    if not (account / "token").is_file():
        raise KubeconfigError(
            f"no --kubeconfig given and no in-cluster service account: {account / 'token'} does not exist"
        )
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    context = _tls_context(ca_file=str(account / "ca.crt"), what="in-cluster service account")
    return _endpoint(server, context, TokenFile(account / "token"), what="in-cluster service account")


def from_kubeconfig(path: Path) -> Endpoint:
    """The current context's API server and user."""
    content = next(iter(read_yaml(path, "kubeconfig", KubeconfigError)), None)
    if not isinstance(content, dict):
        raise KubeconfigError(f"kubeconfig {path} does not hold a kubeconfig (a YAML mapping)")
    loader = _Loader(path, content)
    return loader.endpoint()


@dataclass(frozen=True)
class _Loader:
    path: Path
    content: dict[str, Any]

    def fail(self, message: str) -> KubeconfigError:
        return KubeconfigError(f"kubeconfig {self.path}: {message}")

    def named(self, kind: str, name: str) -> dict[str, Any]:
        """The `kind` entry (clusters, users, contexts) called `name`: its inner mapping."""
        for entry in self.content.get(kind) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                inner = entry.get(kind[:-1])
                if not isinstance(inner, dict):
                    raise self.fail(f"{kind[:-1]} {name!r} has no {kind[:-1]} mapping")
                return inner
        raise self.fail(f"{kind[:-1]} {name!r} (of the current context) is not among its {kind}")

    def file(self, name: str) -> str:
        """A path as written in the kubeconfig, relative ones resolved against its folder."""
        return str(self.path.parent / name) if name and not os.path.isabs(name) else name

    def data(self, value: Any, field: str) -> bytes:
        try:
            return base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"{field} is not base64") from None

    def endpoint(self) -> Endpoint:
        current = self.content.get("current-context")
        if not current or not isinstance(current, str):
            raise self.fail("no current-context")
        context = self.named("contexts", current)
        cluster = self.named("clusters", str(context.get("cluster", "")))
        user = self.named("users", str(context["user"])) if context.get("user") else {}
        server = cluster.get("server")
        if not isinstance(server, str) or not server:
            raise self.fail(f"cluster {context.get('cluster')!r} has no server")
        if "exec" in user or "auth-provider" in user:
            return self._through_kubernetes_package(server, cluster)
        context_tls = self._tls(server, cluster, user)
        return _endpoint(
            server,
            context_tls,
            self._authorization(user),
            what=f"kubeconfig {self.path}",
            tls_server_name=str(cluster.get("tls-server-name") or ""),
            proxy=self._proxy(cluster),
        )

    def _tls(self, server: str, cluster: dict[str, Any], user: dict[str, Any]) -> ssl.SSLContext | None:
        if not server.startswith("https://"):
            return None
        context = _tls_context(
            ca_file=self.file(str(cluster.get("certificate-authority") or "")),
            ca_data=self.data(cluster["certificate-authority-data"], "certificate-authority-data").decode()
            if cluster.get("certificate-authority-data")
            else "",
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            what=f"kubeconfig {self.path}",
        )
        cert = self._pem(user, "client-certificate")
        key = self._pem(user, "client-key")
        if bool(cert) != bool(key):
            raise self.fail("a client certificate needs both client-certificate and client-key")
        if cert and key:
            _load_cert_chain(context, cert, key, f"kubeconfig {self.path}")
        return context

    def _pem(self, user: dict[str, Any], field: str) -> bytes:
        if user.get(f"{field}-data"):
            return self.data(user[f"{field}-data"], f"{field}-data")
        if user.get(field):
            name = self.file(str(user[field]))
            try:
                return Path(name).read_bytes()
            except OSError as err:
                raise self.fail(f"{field} {name}: {err.strerror}") from None
        return b""

    def _authorization(self, user: dict[str, Any]) -> Authorization:
        if user.get("token"):
            header = f"Bearer {user['token']}"
            return lambda: header
        if user.get("tokenFile"):
            return TokenFile(Path(self.file(str(user["tokenFile"]))))
        if user.get("username") and user.get("password"):
            basic = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
            return lambda: f"Basic {basic}"
        return _no_authorization

    def _proxy(self, cluster: dict[str, Any]) -> tuple[str, int] | None:
        url = cluster.get("proxy-url")
        if not url:
            return None
        parts = urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(f"proxy-url {url!r}: only http:// proxies are supported")
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)

    def _through_kubernetes_package(self, server: str, cluster: dict[str, Any]) -> Endpoint:
        """exec plugins and auth-providers: the `kubernetes` package runs them and refreshes what they give."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_kube_config(config_file=str(self.path), client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (config.ConfigException, ValueError, TypeError, KeyError, AttributeError, OSError) as err:
            raise self.fail(" ".join(str(err).split())) from None
        context = self._tls(server, cluster, {})
        if context is not None and configuration.cert_file and configuration.key_file:
            _load_cert_chain(
                context,
                Path(configuration.cert_file).read_bytes(),
                Path(configuration.key_file).read_bytes(),
                f"kubeconfig {self.path}",
            )

        def authorization() -> str | None:
            if configuration.refresh_api_key_hook is not None:
                configuration.refresh_api_key_hook(configuration)
            header = configuration.get_api_key_with_prefix("authorization")
            return str(header) if header else None

        return _endpoint(server, context, authorization, what=f"kubeconfig {self.path}", proxy=self._proxy(cluster))


def _endpoint(
    server: str,
    tls: ssl.SSLContext | None,
    authorization: Authorization,
    *,
    what: str,
    tls_server_name: str = "",
    proxy: tuple[str, int] | None = None,
) -> Endpoint:
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KubeconfigError(f"{what}: server {server!r} is not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise KubeconfigError(f"{what}: server {server!r} has no valid port") from None
    return Endpoint(server.rstrip("/"), parts.hostname, port, tls, authorization, tls_server_name, proxy)


def _tls_context(*, ca_file: str = "", ca_data: str = "", insecure: bool = False, what: str) -> ssl.SSLContext:
    """Verifies the server against the given CA, or the system's when none is given."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None, cadata=ca_data or None)
    except (OSError, ssl.SSLError) as err:
        raise KubeconfigError(f"{what}: certificate authority {ca_file or '(data)'}: {_reason(err)}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _load_cert_chain(context: ssl.SSLContext, cert: bytes, key: bytes, what: str) -> None:
    """ssl loads a certificate only from files: the PEM goes through a private temp file, gone right after."""
    with tempfile.TemporaryDirectory(prefix="dra-cpu-tls-") as folder:
        path = Path(folder) / "client.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.rstrip(b"\n") + b"\n" + key)
        try:
            context.load_cert_chain(str(path))
        except ssl.SSLError as err:
            raise KubeconfigError(f"{what}: client certificate and key: {_reason(err)}") from None


def _reason(err: OSError) -> str:
    return str(err.strerror or err.reason if isinstance(err, ssl.SSLError) else err.strerror or err)
