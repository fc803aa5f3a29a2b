"""The few `kubernetes` client calls tests and benchmarks make whose annotations say less, or other, than they do.

`kubernetes.config` and `ApiClient.close` are unannotated (calling them from typed code is an error under --strict),
and a typed-client call made with `_preload_content=False` is annotated to return the parsed model but returns the
raw urllib3 response. Each is wrapped here once, with the type it really has."""

from __future__ import annotations

from pathlib import Path

import kubernetes
import urllib3


def new_api_client(kubeconfig: Path | str) -> kubernetes.client.ApiClient:
    """An ApiClient for the cluster and credentials of a kubeconfig file."""
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    assert isinstance(client, kubernetes.client.ApiClient)
    return client


def close_api_client(client: kubernetes.client.ApiClient) -> None:
    """Closes the client's connection pool (and its thread pool, if an async request made one)."""
    client.close()  # type: ignore[no-untyped-call]


def unparsed(response: object) -> urllib3.BaseHTTPResponse:
    """What a typed-client call made with `_preload_content=False` returns: the undecoded HTTP response."""
    assert isinstance(response, urllib3.BaseHTTPResponse), f"{type(response).__name__} is not an HTTP response"
    return response
