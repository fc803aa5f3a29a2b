"""Reading a kubeconfig and the in-cluster service account (kube/kubeconfig.py), without a server: what each field
becomes, and a one-line error naming the file and the field for each kind of mistake. The requests these settings
make against the real API server are in test_apiserver.py."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dra_cpu.kube.kubeconfig import TOKEN_REREAD_SECONDS, KubeconfigError, TokenFile, from_kubeconfig, in_cluster


def write(path: Path, cluster: dict[str, Any], user: dict[str, Any] | None = None, **extra: Any) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user or {}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
        **extra,
    }
    path.write_text(json.dumps(config))
    return path


def test_server_token_and_verification(tmp_path: Path) -> None:
    endpoint = from_kubeconfig(
        write(tmp_path / "config", {"server": "https://[::1]:6443/", "tls-server-name": "api"}, {"token": "abc"})
    )
    assert (endpoint.server, endpoint.host, endpoint.port) == ("https://[::1]:6443", "::1", 6443)
    assert endpoint.authorization() == "Bearer abc"
    assert endpoint.tls is not None and endpoint.tls.verify_mode == ssl.CERT_REQUIRED
    assert endpoint.tls_server_name == "api"
    insecure = from_kubeconfig(
        write(tmp_path / "insecure", {"server": "https://h", "insecure-skip-tls-verify": True}, {})
    )
    assert insecure.port == 443 and insecure.tls is not None and insecure.tls.verify_mode == ssl.CERT_NONE
    assert insecure.authorization() is None
    plain = from_kubeconfig(write(tmp_path / "plain", {"server": "http://h:8080", "proxy-url": "http://p:3128"}))
    assert plain.tls is None and plain.proxy == ("p", 3128)


def test_basic_auth(tmp_path: Path) -> None:
    endpoint = from_kubeconfig(write(tmp_path / "config", {"server": "http://h"}, {"username": "a", "password": "b"}))
    assert endpoint.authorization() == f"Basic {base64.b64encode(b'a:b').decode()}"


def test_a_token_file_is_read_again_after_a_minute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("one\n")
    # Relative to the kubeconfig's folder, as kubectl reads it.
    endpoint = from_kubeconfig(write(tmp_path / "config", {"server": "http://h"}, {"tokenFile": "token"}))
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    assert isinstance(endpoint.authorization, TokenFile)
    endpoint.authorization._read_at = now[0]
    (tmp_path / "token").write_text("two\n")
    assert endpoint.authorization() == "Bearer one"
    now[0] += TOKEN_REREAD_SECONDS
    assert endpoint.authorization() == "Bearer two"
    # A token file that went away keeps the last token: the server says when it is no longer good.
    (tmp_path / "token").unlink()
    now[0] += TOKEN_REREAD_SECONDS
    assert endpoint.authorization() == "Bearer two"


@pytest.mark.parametrize(
    ("cluster", "user", "extra", "message"),
    [
        ({"server": "https://h"}, {}, {"current-context": ""}, "no current-context"),
        ({"server": "https://h"}, {}, {"current-context": "y"}, "context 'y' (of the current context) is not among"),
        ({}, {}, {}, "cluster 'c' has no server"),
        ({"server": "ftp://h"}, {}, {}, "server 'ftp://h' is not an http(s) URL"),
        ({"server": "https://h:port"}, {}, {}, "server 'https://h:port' has no valid port"),
        ({"server": "https://h", "certificate-authority-data": "%%"}, {}, {}, "authority-data is not base64"),
        ({"server": "https://h", "certificate-authority": "no.crt"}, {}, {}, "certificate authority {dir}/no.crt"),
        ({"server": "https://h"}, {"client-certificate-data": "Zm9v"}, {}, "needs both client-certificate and"),
        ({"server": "https://h"}, {"client-certificate": "c.pem", "client-key": "k.pem"}, {}, "client-certificate"),
        ({"server": "http://h", "proxy-url": "socks5://p:1080"}, {}, {}, "only http:// proxies are supported"),
        ({"server": "http://h"}, {"tokenFile": "missing"}, {}, "token file {dir}/missing: No such file"),
    ],
)
def test_mistakes_are_one_line_naming_the_file_and_field(
    tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "config", cluster, user, **extra)
    with pytest.raises(KubeconfigError) as err:
        from_kubeconfig(path)
    text = str(err.value)
    assert message.format(dir=tmp_path) in text, text
    assert "\n" not in text
    assert text.startswith((f"kubeconfig {path}", "token file"))


def test_a_client_certificate_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    path = write(tmp_path / "config", {"server": "https://h"}, {"client-certificate": "c.pem", "client-key": "k.pem"})
    with pytest.raises(KubeconfigError, match=rf"^kubeconfig {path}: client certificate and key: "):
        from_kubeconfig(path)


def test_in_cluster(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match=r"^no --kubeconfig given and no in-cluster service account: .*not set"):
        in_cluster({}, tmp_path)
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(KubeconfigError, match=f"in-cluster service account: {tmp_path}/token does not exist"):
        in_cluster(environ, tmp_path)
    (tmp_path / "token").write_text("secret")
    with pytest.raises(KubeconfigError, match=f"in-cluster service account: certificate authority {tmp_path}/ca"):
        in_cluster(environ, tmp_path)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days",
         "1", "-subj", "/CN=ca", "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    endpoint = in_cluster(environ, tmp_path)
    assert (endpoint.server, endpoint.port, endpoint.authorization()) == ("https://[fd00::1]:443", 443, "Bearer secret")
