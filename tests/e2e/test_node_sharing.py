"""The sharing rule on a real node (kube-scheduler, the real kubelet 1.37, containerd with NRI, dra-cpu installed by
helm): a claim that two pods name serves one of them at a time; the other waits in CreateContainerError, and starts
pinned once the claim is handed to it, without anything restarted and without being deleted. Each refused state
shows its way out: the holder deleted, the holder ended, the waiting pod's CPU limit raised in place."""

from __future__ import annotations

import json
from typing import Any

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.sharing import ONE_POD_AT_A_TIME
from tests.harness.cluster.chart import InstalledDriver
from tests.harness.cluster.client import Kube
from tests.harness.cluster.objects import busybox_pod, claim_path, cpu_claim
from tests.harness.cluster.pods import create_all, delete_pod, pod_path, wait_running
from tests.harness.driver_files import cdi_spec_env, cdi_spec_uids, checkpoint_claims
from tests.harness.nodes.kubelet import container_id
from tests.harness.nodes.real import RealNode
from tests.harness.poll import NotYet, wait_until

# The kubelet retries a refused container after a back-off that doubles from 10 s (10, 20, 40, 80 s, ...); the
# hand-over is learnt from the holder's end (the daemon's pod watch) or from a refusal, so a waiting pod starts at
# the first retry after the claim controller dropped its holder from reservedFor: up to some 80 s after the holder
# ends when the pod had waited a minute already, and twice that where only a refusal tells (CI once saw 147 s).
# Generous, for a loaded machine.
HANDOVER_SECONDS = 240


def _refusal(kube: Kube, namespace: str, name: str) -> str:
    """The message of the pod's first container while it waits in CreateContainerError, else ""."""
    pod = kube.get(pod_path(namespace, name))
    for status in pod.get("status", {}).get("containerStatuses", []):
        waiting = status.get("state", {}).get("waiting", {})
        if waiting.get("reason") == "CreateContainerError":
            return str(waiting.get("message", ""))
    return ""


def _refused(kube: Kube, namespace: str, name: str, *parts: str) -> str:
    """The pod's CreateContainerError message once it has every one of `parts`."""

    def refused() -> str | NotYet:
        message = _refusal(kube, namespace, name)
        return message if message and all(p in message for p in parts) else NotYet(message)

    return wait_until(refused, f"pod {namespace}/{name} refused with {parts}", HANDOVER_SECONDS)


def _resize(kube: Kube, namespace: str, name: str, cpu: str) -> None:
    """In place (the resize subresource, as `kubectl patch --subresource resize`): container app's CPU requests and
    limits become `cpu`."""
    resources = {"requests": {"cpu": cpu}, "limits": {"cpu": cpu}}
    kube.request(
        "PATCH",
        f"{pod_path(namespace, name)}/resize",
        {"spec": {"containers": [{"name": "app", "resources": resources}]}},
        content_type="application/strategic-merge-patch+json",
    )


def _uid(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["uid"])


def _assert_holds(driver: InstalledDriver[RealNode], claim_uid: str, pod: dict[str, Any]) -> CPUSet:
    """The pod runs on the claim's CPUs (seen inside it, from its first process and its cgroup) and the driver's
    checkpoint and CDI spec name it as the claim's pod, and no other. Returns the CPUs."""
    seen = driver.node.pinning(pod)
    cpus = seen.claimed[claim_uid]
    assert seen.inside[0] == seen.init[0] == seen.cgroup[0] == cpus, seen
    record = checkpoint_claims(driver.state_dir)[claim_uid]
    assert record["podUIDs"] == [_uid(pod)], record
    assert CPUSet.parse(",".join(d["cpus"] for d in record["devices"] if d["cpus"])) == cpus
    env = cdi_spec_env(driver.node.cdi_dir, claim_uid)
    assert env[f"DRA_PODS_{claim_uid}"] == _uid(pod), env
    return cpus


def _nothing_of(driver: InstalledDriver[RealNode], pod_uid: str, claim_uid: str) -> None:
    """The driver's checkpoint and the claim's CDI spec no longer mention the pod."""
    assert pod_uid not in (driver.state_dir / "checkpoint.json").read_text()
    assert claim_uid in cdi_spec_uids(driver.node.cdi_dir)
    assert pod_uid not in json.dumps(cdi_spec_env(driver.node.cdi_dir, claim_uid))


def test_the_pod_waiting_for_a_claim_runs_pinned_once_its_holder_is_deleted(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str
) -> None:
    """Issue 21 item 2: the claim followed its reservedFor to the second pod, with nothing restarted."""
    kube = dra_cpu_node.node.kube
    create_all(kube, namespace, [cpu_claim("c"), busybox_pod("first", {"cpus": "c"})])
    first = wait_running(kube, namespace, "first")
    claim_uid = _uid(kube.get(claim_path(namespace, "c")))
    cpus = _assert_holds(dra_cpu_node, claim_uid, first)
    create_all(kube, namespace, [busybox_pod("second", {"cpus": "c"})])
    second_uid = _uid(kube.get(pod_path(namespace, "second")))
    message = _refused(kube, namespace, "second", f"is held by pod {_uid(first)}", ONE_POD_AT_A_TIME)
    assert f"container app of pod {namespace}/second ({second_uid}) can use it once that pod has ended" in message

    delete_pod(kube, namespace, "first")
    second = wait_running(kube, namespace, "second", HANDOVER_SECONDS)
    assert _assert_holds(dra_cpu_node, claim_uid, second) == cpus, "the same CPUs, now the second pod's"
    _nothing_of(dra_cpu_node, _uid(first), claim_uid)
    reserved = kube.get(claim_path(namespace, "c"))["status"]["reservedFor"]
    assert [r["uid"] for r in reserved] == [second_uid]


def test_a_pod_waiting_for_a_claim_starts_when_its_holder_ends(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str
) -> None:
    """The way out without deleting any pod: the holder ran to its end (Succeeded)."""
    kube = dra_cpu_node.node.kube
    holder = busybox_pod("job", {"cpus": "c"})
    holder["spec"]["restartPolicy"] = "Never"
    holder["spec"]["containers"][0]["command"] = ["sh", "-c", "sleep 30"]
    create_all(kube, namespace, [cpu_claim("c"), holder])
    job = wait_running(kube, namespace, "job")
    claim_uid = _uid(kube.get(claim_path(namespace, "c")))
    create_all(kube, namespace, [busybox_pod("next", {"cpus": "c"})])
    _refused(kube, namespace, "next", f"is held by pod {_uid(job)}")
    nxt = wait_running(kube, namespace, "next", HANDOVER_SECONDS + 30)
    assert kube.get(pod_path(namespace, "job"))["status"]["phase"] == "Succeeded"
    _assert_holds(dra_cpu_node, claim_uid, nxt)
    _nothing_of(dra_cpu_node, _uid(job), claim_uid)
    # The daemon learnt of the holder's end from its watch of the node's pods, not only from a refusal.
    daemon = dra_cpu_node.ready_pod(node=nxt["spec"]["nodeName"])["metadata"]["name"]
    logs = dra_cpu_node.logs(daemon)
    assert any("the pod a waited-for claim serves ended" in line and _uid(job) in line for line in logs.splitlines()), (
        logs[-3000:]
    )


def test_a_waiting_pod_whose_limit_is_too_low_is_told_why_and_starts_once_resized(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str
) -> None:
    """The way out of a hand-over the CFS check refuses: the waiting pod's CPU limit raised in place."""
    kube = dra_cpu_node.node.kube
    tight = busybox_pod("tight", {"cpus": "c"})
    tight["spec"]["containers"][0]["resources"] |= {"requests": {"cpu": "500m"}, "limits": {"cpu": "500m"}}
    create_all(kube, namespace, [cpu_claim("c"), busybox_pod("first", {"cpus": "c"})])
    first = wait_running(kube, namespace, "first")
    claim_uid = _uid(kube.get(claim_path(namespace, "c")))
    create_all(kube, namespace, [tight])
    _refused(kube, namespace, "tight", f"is held by pod {_uid(first)}")
    delete_pod(kube, namespace, "first")
    _refused(
        kube,
        namespace,
        "tight",
        "is held by no pod",
        f"this pod cannot hold it: pod {namespace}/tight: container 'app' would be CFS-throttled to 0.5 CPUs",
        "raise that limit to at least 1",
    )
    _nothing_of(dra_cpu_node, _uid(first), claim_uid)
    _resize(kube, namespace, "tight", "1")
    pod = wait_running(kube, namespace, "tight", HANDOVER_SECONDS)
    _assert_holds(dra_cpu_node, claim_uid, pod)
    assert dra_cpu_node.node.host_cpu_quota(container_id(pod)) == 1, "the container runs with the raised limit"
