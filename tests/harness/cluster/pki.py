"""The control plane's credentials, made with openssl: a CA, the certificates it issues (servers, components,
users, kubelets), the service-account signing key, and kubeconfigs that use them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class PkiError(Exception):
    """openssl refused to make a key or a certificate."""


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PkiError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


# ECDSA P-256 keys: quick to make.
_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    """A CA and the certificates issued by it, all in `dir`."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def create_ca(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", *_NEW_KEY, "-days", "3650", "-subj", "/CN=dra-cpu-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=self.dir,
        )  # fmt: skip

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
            "req", "-new", *_NEW_KEY, "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=self.dir
        )
        serial = str(int.from_bytes(os.urandom(8), "big"))
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", serial,
            "-days", "3650", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=self.dir,
        )  # fmt: skip
        (self.dir / f"{name}.csr").unlink()
        (self.dir / f"{name}.ext").unlink()

    def key_pair(self, name: str) -> None:
        """name.key (EC private key, PEM) and name.pub: service-account token signing."""
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=self.dir)
        _openssl("ec", "-in", f"{name}.key", "-pubout", "-out", f"{name}.pub", cwd=self.dir)

    def client_user(self, name: str) -> dict[str, str]:
        """The kubeconfig user of the client certificate `name` (issued before)."""
        return {"client-certificate": str(self.dir / f"{name}.crt"), "client-key": str(self.dir / f"{name}.key")}

    def node_user(self, node: str, cert: str) -> dict[str, str]:
        """A kubeconfig user for the kubelet of node `node`: a new client certificate (file `cert`) of group
        system:nodes and user system:node:<node>, which the Node authorizer and NodeRestriction admit."""
        self.issue(cert, f"/O=system:nodes/CN=system:node:{node}")
        return self.client_user(cert)


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
