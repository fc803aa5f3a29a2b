"""The control plane fixture itself: the components of hack/testenv/kubernetes.sh's version, the DRA feature gates on,
a Node from `create_node` that the real scheduler places pods on with no kubelet there, and the controllers of a
user's cluster at work."""

from __future__ import annotations

import subprocess
import uuid
from fractions import Fraction
from typing import Any

from dra_cpu.core.quantity import parse_quantity
from tests.harness.cluster.client import Kube, close_api_client
from tests.harness.cluster.control_plane import FEATURE_GATES, SCRIPT, ControlPlane
from tests.harness.cluster.objects import (
    busybox_pod,
    create_namespace,
    create_node,
    delete_node,
    deployment,
    job,
    new_namespace,
    pinned_pod,
)
from tests.harness.cluster.pods import wait_scheduled
from tests.harness.poll import wait_until


def test_components_are_the_version_built_and_run_with_the_dra_gates(control_plane: ControlPlane) -> None:
    version = subprocess.run(["bash", str(SCRIPT), "version"], capture_output=True, text=True, check=True).stdout
    api = control_plane.admin()
    try:
        served = Kube(api).get("/version")
    finally:
        close_api_client(api)
    assert served["gitVersion"] == version.strip()
    for name in ("kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubelet", "kubectl"):
        args = ["version", "--client"] if name == "kubectl" else ["--version"]
        shown = subprocess.run(
            [str(control_plane.binaries.path(name)), *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert version.strip() in shown.stdout, (name, shown.stdout, shown.stderr)
    # Every gate asked for is passed unless this Kubernetes no longer lists it (GA, locked on).
    assert set(control_plane.gates) <= set(FEATURE_GATES)
    assert "DRAConsumableCapacity" in control_plane.gates
    for name in ("kube-apiserver", "kube-scheduler", "kube-controller-manager"):
        assert control_plane.log(name).stat().st_size > 0


def test_a_pod_is_scheduled_onto_a_created_node_and_the_node_stays_ready(control_plane: ControlPlane) -> None:
    api = control_plane.admin()
    kube = Kube(api)
    node, namespace = f"node-{uuid.uuid4().hex[:10]}", f"test-{uuid.uuid4().hex[:10]}"
    try:
        stored = create_node(api, node, cpus=4, memory=8 << 30, hugepages={"2Mi": 64 << 20})
        allocatable = {k: parse_quantity(v) for k, v in stored["status"]["allocatable"].items()}
        assert (allocatable["cpu"], allocatable["hugepages-2Mi"]) == (Fraction(4), Fraction(64 << 20))
        assert allocatable["memory"] == (8 << 30) - (64 << 20)
        create_namespace(api, namespace)
        wait_until(lambda: kube.find(f"/api/v1/namespaces/{namespace}/serviceaccounts/default"), "default SA")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "3"}}}]},
        }
        kube.create(pinned_pod(pod, node), namespace)
        assert wait_scheduled(kube, namespace, "p")["spec"]["nodeName"] == node
        conditions = {c["type"]: c["status"] for c in kube.get(f"/api/v1/nodes/{node}")["status"]["conditions"]}
        assert conditions == {"Ready": "True"}
        assert "taints" not in kube.get(f"/api/v1/nodes/{node}")["spec"]
        kube.delete(f"/api/v1/namespaces/{namespace}/pods/p", force=True)
    finally:
        delete_node(api, node)
        close_api_client(api)


def test_the_controllers_give_namespaces_service_accounts_and_token_secrets(control_plane: ControlPlane) -> None:
    api = control_plane.admin()
    kube = Kube(api)
    try:
        namespace = new_namespace(kube)  # waits for the serviceaccount controller's `default`
        kube.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "token", "annotations": {"kubernetes.io/service-account.name": "default"}},
                "type": "kubernetes.io/service-account-token",
            },
            namespace,
        )
        secret = f"/api/v1/namespaces/{namespace}/secrets/token"
        token = wait_until(lambda: kube.get(secret).get("data", {}).get("token"), "the token controller")
        assert len(token) > 100
        wait_until(lambda: kube.find(f"/api/v1/namespaces/{namespace}/configmaps/kube-root-ca.crt"), "kube-root-ca.crt")
    finally:
        close_api_client(api)


def test_a_deployment_and_a_job_get_their_pods_from_the_controllers(control_plane: ControlPlane) -> None:
    """The workload controllers run: a Deployment gets a ReplicaSet and that its pods, a Job its pod, and the
    scheduler binds them to the node (no kubelet runs them here: tests/e2e runs a Deployment's pod on a real node)."""
    api = control_plane.admin()
    kube = Kube(api)
    node = f"node-{uuid.uuid4().hex[:10]}"
    try:
        create_node(api, node, cpus=4, memory=8 << 30)
        namespace = new_namespace(kube)
        pod = pinned_pod(busybox_pod("p"), node)
        kube.create(deployment("web", pod, replicas=2), namespace)
        kube.create(job("once", pod), namespace)
        pods_path = f"/api/v1/namespaces/{namespace}/pods"

        def bound(app: str, count: int) -> list[dict[str, Any]] | None:
            pods = kube.list(pods_path, label_selector=f"app={app}")
            return pods if len(pods) == count and all(p["spec"].get("nodeName") == node for p in pods) else None

        web = wait_until(lambda: bound("web", 2), "the Deployment's two pods, bound to the node")
        [replica_set] = {o["name"] for p in web for o in p["metadata"]["ownerReferences"] if o["kind"] == "ReplicaSet"}
        owners = kube.get(f"/apis/apps/v1/namespaces/{namespace}/replicasets/{replica_set}")["metadata"]
        assert [(o["kind"], o["name"]) for o in owners["ownerReferences"]] == [("Deployment", "web")]
        wait_until(
            lambda: (
                kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/web").get("status", {}).get("replicas") == 2
            ),
            "the Deployment's status to count its two pods",
        )
        [once] = wait_until(lambda: bound("once", 1), "the Job's pod, bound to the node")
        assert [(o["kind"], o["name"]) for o in once["metadata"]["ownerReferences"]] == [("Job", "once")]
        # Owner-based deletion: the Deployment's ReplicaSet goes with it, and its pods are deleted (they stay, ending,
        # until a kubelet confirms: none runs them here).
        kube.delete(f"/apis/apps/v1/namespaces/{namespace}/deployments/web")
        wait_until(
            lambda: (
                kube.find(f"/apis/apps/v1/namespaces/{namespace}/replicasets/{replica_set}") is None
                and all(p["metadata"].get("deletionTimestamp") for p in kube.list(pods_path, label_selector="app=web"))
            ),
            "the garbage collector to delete the Deployment's ReplicaSet and pods",
        )
        for made in [*web, once]:
            kube.delete(f"{pods_path}/{made['metadata']['name']}", force=True)
    finally:
        delete_node(api, node)
        close_api_client(api)
