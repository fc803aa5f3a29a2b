"""The whole node path, every piece real except the kubelet: `dra-cpu run` with NRI enforcement against containerd
(2.1 and 1.7) and the real API server, registration and NodePrepareResources through the kubelet sockets, the CDI
device passed through CRI as the kubelet passes it, cpusets read back inside the containers and from the host."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import kubernetes

from dra_cpu.core.claims import ClaimRef, allocated_claim_object
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.kubelet.client import KubeletClient
from dra_cpu.store.metadata_files import decode
from tests.harness.claims import ServerClaims, result
from tests.harness.cluster.control_plane import ApiServer
from tests.harness.poll import wait_until
from tests.harness.runtimes.containerd import Containerd
from tests.harness.typed import as_dict

ONLINE = CPUSet.parse(Path("/sys/devices/system/cpu/online").read_text())
NODE = "node-e2e"


def test_claimed_container_is_pinned_and_others_keep_off(
    fresh_containerd: Containerd, apiserver: ApiServer, kube_api: kubernetes.client.ApiClient, kube_namespace: str
) -> None:
    cri = fresh_containerd.cri
    root = Path(tempfile.mkdtemp(prefix="de-", dir="/tmp"))
    registration = root / "kubelet/plugins_registry/dra.cpu-reg.sock"
    # A container of another pod, running before any claim: it starts on every CPU.
    bystander_pod = cri.run_pod("bystander")
    bystander = cri.create_container(bystander_pod, "app")
    daemon = subprocess.Popen(
        [
            sys.executable, "-m", "dra_cpu", "run",
            "--node-name", NODE,
            "--kubeconfig", str(apiserver.kubeconfig),
            "--enforcement", "nri",
            "--nri-socket", str(fresh_containerd.nri_socket),
            "--kubelet-root-dir", str(root / "kubelet"),
            "--cdi-root", str(fresh_containerd.cdi_dir),
            "--state-dir", str(root / "state"),
            "--metrics-address", "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until(registration.exists, "registration after NRI synchronized")
        kubelet = KubeletClient.register(registration)
        pod_uid = str(uuid.uuid4())
        claim_cpus = 1 if len(ONLINE) <= 2 else 2
        obj = allocated_claim_object(
            kube_namespace, "pinned", [result("cpu-numa0", cpus=claim_cpus) | {"pool": NODE}], pod_uids=[pod_uid]
        )
        ServerClaims(kubernetes.client.CustomObjectsApi(kube_api)).put(obj)
        uid = obj["metadata"]["uid"]
        ref = ClaimRef(kube_namespace, "pinned", uid)

        # The node's pool is on the API server, as the scheduler would see it.
        def published() -> bool:
            listed = kubernetes.client.CustomObjectsApi(kube_api).list_cluster_custom_object(
                "resource.k8s.io", "v1", "resourceslices", field_selector=f"spec.nodeName={NODE}"
            )
            slices = as_dict(listed)["items"]
            return "cpu-numa0" in {d["name"] for s in slices for d in s["spec"]["devices"]}

        wait_until(published, "the node's ResourceSlices on the API server")
        response = kubelet.prepare([ref]).claims[uid]
        assert response.error == ""
        # The claim's CPUs and its device metadata file (KEP-5304, on by default).
        cdi_ids = list(response.devices[0].cdi_device_ids)
        assert cdi_ids[1] == f"dra.cpu/metadata={uid}_cpus"
        spec = json.loads(next(fresh_containerd.cdi_dir.glob(f"*{uid}.json")).read_text())
        granted = CPUSet.parse(
            next(e for e in spec["devices"][0]["containerEdits"]["env"] if e.startswith("DRA_CPUSET_")).split("=")[1]
        )
        shared = ONLINE - granted

        pod = cri.run_pod("app", uid=pod_uid)
        app = cri.create_container(pod, "app", cdi_devices=cdi_ids)
        assert cri.allowed_inside(app).cpus == granted
        inside = "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/pinned/cpus/dra.cpu-metadata.json"
        metadata = decode(cri.exec_sync(app, ["cat", inside]).stdout.encode())
        [device] = metadata["requests"][0]["devices"]
        assert device["attributes"]["dra.cpu/allocatedCPUs"] == {"string": str(granted)}
        assert cri.allowed_on_host(app).cpus == granted
        wait_until(lambda: cri.allowed_on_host(bystander).cpus == shared, "the bystander to shrink to the shared pool")

        assert kubelet.unprepare([ref]).claims[uid].error == ""
        wait_until(lambda: cri.allowed_on_host(bystander).cpus == ONLINE, "the bystander to regrow")
        kubelet.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    assert daemon.returncode == 0, stderr
