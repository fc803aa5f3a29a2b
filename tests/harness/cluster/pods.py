"""Waiting for what the scheduler, the controllers and a kubelet do with pods and claims, and the pods' events
for failure messages."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes import client

from tests.harness.cluster.client import Kube
from tests.harness.cluster.objects import claim_path
from tests.harness.poll import NotYet, wait_until

RUNNING_SECONDS = 120.0


def create_all(kube: Kube, namespace: str, docs: Iterable[Mapping[str, Any]]) -> None:
    for doc in docs:
        kube.create(doc, namespace)


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


def events(kube: Kube, namespace: str, name: str) -> list[str]:
    """`reason: message` of the pod's events, oldest first."""
    listed = kube.list(f"/api/v1/namespaces/{namespace}/events", field_selector=f"involvedObject.name={name}")
    listed.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return [f"{e.get('reason')}: {e.get('message')}" for e in listed]


def wait_prepare_refused(kube: Kube, namespace: str, name: str, message: str, timeout: float = 90.0) -> None:
    """Until the pod has a FailedPrepareDynamicResources event whose message contains `message` (the driver
    refused a claim at NodePrepareResources); the pod is then still Pending."""
    seen = wait_until(
        lambda: [e for e in events(kube, namespace, name) if message in e] or None,
        "the driver's refusal in the pod's events",
        timeout,
    )
    assert seen[0].startswith("FailedPrepareDynamicResources: "), seen
    assert kube.get(pod_path(namespace, name))["status"]["phase"] == "Pending"


def wait_running(
    kube: Kube,
    namespace: str,
    name: str,
    timeout: float = RUNNING_SECONDS,
    details: Callable[[], str] = lambda: "",
) -> dict[str, Any]:
    """The pod once Running with every container started; on timeout the failure shows its status and events (and
    `details()`, the node's logs)."""

    def check() -> dict[str, Any] | NotYet:
        pod: dict[str, Any] = kube.get(pod_path(namespace, name))
        statuses = pod.get("status", {}).get("containerStatuses", [])
        started = statuses and all(s.get("state", {}).get("running") for s in statuses)
        if pod.get("status", {}).get("phase") == "Running" and started:
            return pod
        return NotYet(pod.get("status", {}).get("phase"))

    def status_and_events() -> str:
        pod = kube.find(pod_path(namespace, name)) or {}
        status = json.dumps(pod.get("status", {}), indent=1)[:3000]
        return f"status: {status}\nevents: {events(kube, namespace, name)}\n{details()}".rstrip()

    return wait_until(check, f"pod {namespace}/{name} to run", timeout, 0.3, details=status_and_events)


def delete_pod(kube: Kube, namespace: str, name: str, timeout: float = 90.0) -> None:
    """Deletes with a 1 s grace period and waits until the kubelet has finished with it (the object is gone only
    after its containers stopped and its claims were unprepared)."""
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 1}
    try:
        kube.request("DELETE", pod_path(namespace, name), body)
    except client.ApiException as err:
        if err.status != 404:
            raise
    wait_until(lambda: kube.find(pod_path(namespace, name)) is None, f"pod {namespace}/{name} to be gone", timeout)


def wait_scheduled(kube: Kube, namespace: str, pod: str, timeout: float = 90.0) -> dict[str, Any]:
    """The pod once the scheduler bound it to a node; on timeout the failure shows its PodScheduled condition."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}"

    def bound() -> dict[str, Any] | None:
        obj: dict[str, Any] = kube.get(path)
        return obj if obj["spec"].get("nodeName") else None

    return wait_until(
        bound,
        f"pod {namespace}/{pod} to be scheduled",
        timeout,
        details=lambda: f"PodScheduled: {pod_scheduled_condition(kube.get(path))}",
    )


def pod_scheduled_condition(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for condition in pod.get("status", {}).get("conditions", []):
        if condition["type"] == "PodScheduled":
            found: dict[str, Any] = condition
            return found
    return None


def unschedulable(kube: Kube, namespace: str, name: str, timeout: float = 90.0) -> str:
    """The scheduler's message once it gave up on the pod for now (PodScheduled False, Unschedulable)."""

    def condition() -> str | None:
        found = pod_scheduled_condition(kube.get(pod_path(namespace, name))) or {}
        return str(found.get("message")) if found.get("reason") == "Unschedulable" else None

    return wait_until(condition, f"pod {namespace}/{name} to be found unschedulable", timeout)


def wait_allocated(kube: Kube, namespace: str, name: str, timeout: float = 60.0) -> dict[str, Any]:
    def allocated() -> dict[str, Any] | None:
        claim: dict[str, Any] = kube.get(claim_path(namespace, name))
        return claim if claim.get("status", {}).get("allocation") else None

    return wait_until(allocated, f"claim {namespace}/{name} to be allocated", timeout)
