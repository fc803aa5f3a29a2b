"""The CFS quota the kubelet would give a claimed container, against the CPUs the claim pins it to."""

from __future__ import annotations

import pytest

from dra_cpu.core.cpu_quota import throttled
from dra_cpu.core.pod_limits import PodLimitsError
from tests.core.pods import Pods

CLAIM = "web-cpus"
PODS = Pods("cpu", "web", CLAIM, "cpus")
container, pod, mapped = PODS.container, PODS.pod, PODS.mapped


@pytest.mark.parametrize("limit", [None, "4", "4000m", "5.5"])
def test_no_limit_or_enough_is_fine(limit: str | None) -> None:
    assert throttled(pod(container(limit=limit)), CLAIM, 4) == []


def test_a_limit_below_the_claim_is_named_with_the_minimum() -> None:
    [message] = throttled(pod(container(limit="500m")), CLAIM, 2)
    assert message == (
        "pod ns/web: container 'app' would be CFS-throttled to 0.5 CPUs (spec.containers[0].resources.limits.cpu "
        "500m) on the 2 CPUs claim 'web-cpus' pins it to; raise that limit to at least 2, or remove it"
    )


def test_only_containers_using_the_claim_are_checked() -> None:
    sidecar = container("sidecar", limit="100m", claims=())
    other = container("other", limit="100m", claims=("gpu",))
    assert throttled(pod(container(), sidecar, other), CLAIM, 4) == []
    # Another claim of the pod is not ours.
    assert throttled(pod(container(limit="1")), "another-claim", 4) == []


def test_every_container_sharing_the_claim_is_checked_including_init_sidecars() -> None:
    messages = throttled(
        pod(container("a", limit="1"), container("b", limit="3"), init=(container("init", limit="2"),)), CLAIM, 3
    )
    assert [m.split("'")[1] for m in messages] == ["init", "a"]
    assert "spec.initContainers[0].resources.limits.cpu 2" in messages[0]


def test_a_claim_made_from_a_template_is_found_through_the_pod_status() -> None:
    template = {"resourceClaimTemplateName": "cpus-template"}
    status = {"resourceClaimStatuses": [{"name": "cpus", "resourceClaimName": "web-cpus-x7k2p"}]}
    spec = pod(container(limit="1"), claim=template, status=status)
    assert len(throttled(spec, "web-cpus-x7k2p", 2)) == 1
    assert throttled(spec, CLAIM, 2) == []


def test_the_kubelet_adds_mapped_cpus_to_an_explicit_limit_only() -> None:
    # KEP-5517: limits.cpu 1m (for a Guaranteed pod) + the claim's 4 mapped CPUs.
    assert throttled(pod(container(limit="1m"), status=mapped("4", "app")), CLAIM, 4) == []
    # The mapping counts for the containers it lists.
    [message] = throttled(pod(container(limit="1"), status=mapped("4", "other")), CLAIM, 4)
    assert "to 1 CPU (" in message
    # A pod-level limit gets nothing added: it must cover the claim by itself.
    [message] = throttled(pod(container(), pod_limit="2", status=mapped("4", "app")), CLAIM, 4)
    assert "(spec.resources.limits.cpu 2)" in message and "at least 4" in message


def test_a_partly_mapped_limit_asks_for_the_rest() -> None:
    [message] = throttled(pod(container(limit="500m"), status=mapped("2", "app")), CLAIM, 4)
    assert "to 2.5 CPUs (spec.containers[0].resources.limits.cpu 500m + 2 node-allocatable)" in message
    assert message.endswith("raise that limit to at least 2, or remove it")


def test_a_container_limit_wins_over_the_pod_level_limit() -> None:
    assert throttled(pod(container(limit="4"), pod_limit="1"), CLAIM, 4) == []


def test_a_malformed_limit_names_the_field() -> None:
    with pytest.raises(PodLimitsError, match=r"pod ns/web: spec.containers\[0\].resources.limits.cpu must be a"):
        throttled(pod(container(limit="lots")), CLAIM, 2)


def test_the_containers_of_an_extended_resource_claim_come_from_the_pod_status() -> None:
    """KEP-5004: a container that asks `dra.cpu/cpu: 4` lists no claim; the scheduler names the claim it wrote, and
    which containers use it, in pod.status.extendedResourceClaimStatus."""
    asking, other = container("app", limit="2", claims=()), container("sidecar", limit="1", claims=())
    status = {
        "extendedResourceClaimStatus": {
            "resourceClaimName": "web-extended-resources-abcde",
            "requestMappings": [
                {"containerName": "app", "resourceName": "dra.cpu/cpu", "requestName": "container-0-request-0"}
            ],
        }
    }
    spec, extended = pod(asking, other, status=status), "web-extended-resources-abcde"
    [problem] = throttled(spec, extended, 4)
    assert "container 'app' would be CFS-throttled to 2 CPUs" in problem
    assert throttled(spec, CLAIM, 4) == [], "another claim of the pod: the mapping is not its"
    assert throttled(pod(container("app", limit="4", claims=()), status=status), extended, 4) == []


def test_a_malformed_extended_resource_status_names_the_field() -> None:
    status = {"extendedResourceClaimStatus": {"resourceClaimName": "x", "requestMappings": "app"}}
    with pytest.raises(PodLimitsError, match=r"status\.extendedResourceClaimStatus\.requestMappings must be a list"):
        throttled(pod(container(claims=()), status=status), "x", 1)
