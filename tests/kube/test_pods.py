"""The node's pod cache (kube/pods.py) against the real API server: what prepare's CFS check reads comes from the
watch of the node's pods when the watch has the pod, and from one GET when it does not (yet); a pod replaced under
the same name is never mistaken for the old one; a watch that drops picks up, after the server is back, what
changed meanwhile. The driver's use of it (a prepare refused for a pod created just before) is in
tests/kubelet/test_prepare_apiserver.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from dra_cpu.kube.api import ClusterError
from dra_cpu.kube.apiserver import KubeAPI, connect
from dra_cpu.kube.pods import PodCache
from tests.harness.cluster.client import Kube
from tests.harness.cluster.control_plane import ApiServer
from tests.harness.poll import wait_until
from tests.kube.test_publisher import Outage


def pod(name: str, node: str, claims: bool = True) -> dict[str, Any]:
    """A pod bound to `node` (as the scheduler binds it), with a container limited to 2 CPUs using claim `c`."""
    resources: dict[str, Any] = {"limits": {"cpu": "2"}}
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}]}
    if claims:
        resources["claims"] = [{"name": "cpus"}]
        spec["resourceClaims"] = [{"name": "cpus", "resourceClaimName": "c"}]
    spec["containers"][0]["resources"] = resources
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def admin(kube_api: client.ApiClient, kube_namespace: str) -> Kube:
    kube = Kube(kube_api)
    # No controller manager runs against this server to make the namespace's default service account.
    kube.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, kube_namespace)
    return kube


@pytest.fixture
def node() -> str:
    return f"node-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cached(apiserver: ApiServer, node: str) -> Iterator[KubeAPI]:
    """The driver's client as the daemon connects it: with the node's pod cache, listed once."""
    api = connect(str(apiserver.kubeconfig), node_name=node)
    try:
        assert api.pods is not None
        assert api.pods.listed.wait(10), "the first list of the node's pods"
        yield api
    finally:
        api.close()


def counts(api: KubeAPI) -> tuple[int, int]:
    assert api.pods is not None
    return api.pods.counts


def in_cache(cache: PodCache | None, namespace: str, name: str, uid: str) -> bool:
    assert cache is not None
    return cache.get(namespace, name, uid) is not None


def test_a_pod_created_just_before_it_is_read(cached: KubeAPI, admin: Kube, kube_namespace: str, node: str) -> None:
    made = admin.create(pod("fresh", node), kube_namespace)
    uid = made["metadata"]["uid"]
    # Read at once, as a prepare right after the pod's binding does: from the cache or, if the watch lags, a GET.
    assert cached.get_pod(kube_namespace, "fresh", uid)["metadata"]["uid"] == uid
    wait_until(lambda: in_cache(cached.pods, kube_namespace, "fresh", uid), "the watch to bring the pod")
    hits, misses = counts(cached)
    read = cached.get_pod(kube_namespace, "fresh", uid)
    assert counts(cached) == (hits + 1, misses), "read from the cache, no request"
    assert read["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2"}
    assert "managedFields" not in read["metadata"]


def test_pods_without_claims_or_of_other_nodes_are_not_kept(
    cached: KubeAPI, admin: Kube, kube_namespace: str, node: str
) -> None:
    plain = admin.create(pod("plain", node, claims=False), kube_namespace)["metadata"]["uid"]
    elsewhere = admin.create(pod("elsewhere", f"{node}-other"), kube_namespace)["metadata"]["uid"]
    marker = admin.create(pod("marker", node), kube_namespace)["metadata"]["uid"]
    wait_until(lambda: in_cache(cached.pods, kube_namespace, "marker", marker), "the watch to bring the marker pod")
    assert not in_cache(cached.pods, kube_namespace, "plain", plain)
    assert not in_cache(cached.pods, kube_namespace, "elsewhere", elsewhere)
    # Still read, with a GET, when asked for.
    assert cached.get_pod(kube_namespace, "plain", plain)["metadata"]["uid"] == plain


def test_a_pod_replaced_under_the_same_name_is_read_as_the_new_one(
    cached: KubeAPI, admin: Kube, kube_namespace: str, node: str
) -> None:
    old = admin.create(pod("same", node), kube_namespace)["metadata"]["uid"]
    wait_until(lambda: in_cache(cached.pods, kube_namespace, "same", old), "the watch to bring the first pod")
    admin.delete(f"/api/v1/namespaces/{kube_namespace}/pods/same", force=True)
    new = admin.create(pod("same", node), kube_namespace)["metadata"]["uid"]
    assert new != old
    # Whether or not the watch has caught up: asked for the new uid, the answer is the new pod.
    assert cached.get_pod(kube_namespace, "same", new)["metadata"]["uid"] == new
    wait_until(lambda: in_cache(cached.pods, kube_namespace, "same", new), "the watch to bring the new pod")
    wait_until(lambda: not in_cache(cached.pods, kube_namespace, "same", old), "the watch to drop the old pod")
    # Asked for the old uid, the server's answer is the new pod, which the caller (the driver) sees is another.
    assert cached.get_pod(kube_namespace, "same", old)["metadata"]["uid"] == new


def test_a_watch_that_drops_catches_up_when_the_server_is_back(
    apiserver: ApiServer, admin: Kube, kube_namespace: str, node: str, tmp_path: Path
) -> None:
    outage = Outage(apiserver.url)
    outage.up()
    kubeconfig = yaml.safe_load(apiserver.kubeconfig.read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = outage.url
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    api = connect(str(tmp_path / "kubeconfig"), node_name=node)
    try:
        assert api.pods is not None and api.pods.listed.wait(10)
        kept = admin.create(pod("kept", node), kube_namespace)["metadata"]["uid"]
        gone = admin.create(pod("gone", node), kube_namespace)["metadata"]["uid"]
        wait_until(lambda: in_cache(api.pods, kube_namespace, "gone", gone), "the watch to bring the pods")

        outage.down()
        cut = outage.refused
        wait_until(lambda: outage.refused > cut, "the watch to try again while the server is away")
        # A pod the cache has is still read without the server; one it lacks fails as a request does.
        assert api.get_pod(kube_namespace, "kept", kept)["metadata"]["uid"] == kept
        admin.delete(f"/api/v1/namespaces/{kube_namespace}/pods/gone", force=True)
        new = admin.create(pod("new", node), kube_namespace)["metadata"]["uid"]
        with pytest.raises(ClusterError, match=f"pod {kube_namespace}/new: cannot reach the API server"):
            api.get_pod(kube_namespace, "new", new)

        outage.up()
        wait_until(lambda: in_cache(api.pods, kube_namespace, "new", new), "the relist to bring the new pod")
        wait_until(lambda: not in_cache(api.pods, kube_namespace, "gone", gone), "the relist to drop the deleted pod")
        assert in_cache(api.pods, kube_namespace, "kept", kept)
        # And it watches again: a pod made now arrives by the watch.
        later = admin.create(pod("later", node), kube_namespace)["metadata"]["uid"]
        wait_until(lambda: in_cache(api.pods, kube_namespace, "later", later), "the resumed watch to bring a pod")
    finally:
        api.close()
        outage.close()


def test_the_end_of_a_pod_using_a_claim_is_told_once(
    cached: KubeAPI, admin: Kube, kube_namespace: str, node: str
) -> None:
    """Hand-over learns from the watch when the pod a claim serves ends: in an ended phase, or deleted."""
    ended: list[str] = []
    cached.on_pod_end(ended.append)
    done = admin.create(pod("done", node), kube_namespace)["metadata"]["uid"]
    deleted = admin.create(pod("deleted", node), kube_namespace)["metadata"]["uid"]
    admin.create(pod("plain", node, claims=False), kube_namespace)
    wait_until(lambda: in_cache(cached.pods, kube_namespace, "done", done), "the watch to bring done")
    wait_until(lambda: in_cache(cached.pods, kube_namespace, "deleted", deleted), "the watch to bring deleted")
    assert ended == []

    pods = f"/api/v1/namespaces/{kube_namespace}/pods"
    admin.patch(f"{pods}/done/status", {"status": {"phase": "Running"}})
    admin.patch(f"{pods}/done/status", {"status": {"phase": "Succeeded"}})
    wait_until(lambda: ended == [done], "the pod in phase Succeeded told")
    admin.delete(f"{pods}/deleted", force=True)
    admin.delete(f"{pods}/plain", force=True)
    wait_until(lambda: ended == [done, deleted], "the deleted pod told")
    # Told once: neither a later change of the ended pod nor its deletion tells it again.
    admin.patch(f"{pods}/done/status", {"status": {"message": "later"}})
    admin.delete(f"{pods}/done", force=True)
    marker = admin.create(pod("marker", node), kube_namespace)["metadata"]["uid"]
    wait_until(lambda: in_cache(cached.pods, kube_namespace, "marker", marker), "the watch past the deletions")
    wait_until(lambda: not in_cache(cached.pods, kube_namespace, "done", done), "the watch to drop the ended pod")
    assert ended == [done, deleted]
