"""Talking to the API server from tests and benchmarks: the typed `kubernetes` client where its annotations hold, and
`Kube`, plain JSON by path, where a test compares what it sent with what it reads back field by field.

`kubernetes.config` and `ApiClient.close` are unannotated (calling them from typed code is an error under --strict),
and a typed-client call made with `_preload_content=False` is annotated to return the parsed model but returns the
raw urllib3 response. Each is wrapped here once, with the type it really has."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes import client

MERGE_PATCH = "application/merge-patch+json"


def new_api_client(kubeconfig: Path | str) -> kubernetes.client.ApiClient:
    """An ApiClient for the cluster and credentials of a kubeconfig file."""
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    assert isinstance(api, kubernetes.client.ApiClient)
    return api


def close_api_client(api: kubernetes.client.ApiClient) -> None:
    """Closes the client's connection pool (and its thread pool, if an async request made one)."""
    api.close()  # type: ignore[no-untyped-call]


def unparsed(response: object) -> urllib3.BaseHTTPResponse:
    """What a typed-client call made with `_preload_content=False` returns: the undecoded HTTP response."""
    assert isinstance(response, urllib3.BaseHTTPResponse), f"{type(response).__name__} is not an HTTP response"
    return response


# Kinds a test writes that are not namespaced.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "Node",
        "ClusterRole",
        "ClusterRoleBinding",
        "DeviceClass",
        "ResourceSlice",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
)


def plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


def collection_path(api_version: str, kind: str, namespace: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if kind in CLUSTER_SCOPED:
        return f"{base}/{plural(kind)}"
    if not namespace:
        raise ValueError(f"a {kind} needs a namespace")
    return f"{base}/namespaces/{namespace}/{plural(kind)}"


def object_path(obj: Mapping[str, Any], namespace: str | None = None) -> str:
    meta = obj["metadata"]
    path = collection_path(obj["apiVersion"], obj["kind"], meta.get("namespace") or namespace)
    return f"{path}/{meta['name']}"


@dataclass(frozen=True)
class Kube:
    """Requests by path with JSON bodies, through the typed client's ApiClient (so its credentials, TLS settings and
    bearer tokens apply)."""

    api: client.ApiClient

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> Any:
        """The decoded JSON answer; raises client.ApiException (with .status and .body) for a 4xx/5xx."""
        serialized = self.api.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*serialized)
        data = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise client.ApiException(http_resp=response)
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def find(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when there is none (404)."""
        try:
            found: dict[str, Any] = self.get(path)
            return found
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise

    def list(self, path: str, field_selector: str = "", label_selector: str = "") -> list[dict[str, Any]]:
        query = [(k, v) for k, v in (("fieldSelector", field_selector), ("labelSelector", label_selector)) if v]
        listed = self.request("GET", path, query=query)
        # Items of a list carry no apiVersion and kind; give them those of the list, as kubectl does.
        kind = {"apiVersion": listed["apiVersion"], "kind": str(listed["kind"]).removesuffix("List")}
        return [{**kind, **item} for item in listed["items"]]

    def create(self, obj: Mapping[str, Any], namespace: str | None = None, strict: bool = True) -> dict[str, Any]:
        path = collection_path(obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace") or namespace)
        query = [("fieldValidation", "Strict")] if strict else []
        created: dict[str, Any] = self.request("POST", path, dict(obj), query=query)
        return created

    def patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self.request("PATCH", path, dict(patch), content_type=MERGE_PATCH)
        return patched

    def delete(self, path: str, force: bool = False) -> None:
        """Deletes, tolerating 404. `force`: grace period 0, as no kubelet is there to confirm a pod's end."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0} if force else None
        try:
            self.request("DELETE", path, body)
        except client.ApiException as err:
            if err.status != 404:
                raise
