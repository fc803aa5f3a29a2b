#!/usr/bin/env python3
"""Pods on a real node with dra-cpu, figures printed. Run as root, after `hack/install.sh --test` and
`hack/install-testenv.sh`, from the repository root:

    .venv/bin/python hack/bench/pods.py [--pods 20] [--idle-minutes 5]

It starts what the real-node tests start (tests/harness/README.md): etcd, kube-apiserver, kube-scheduler and
kube-controller-manager 1.37 on loopback, a kubelet with containerd 2.1 (NRI, CDI) as node 127.0.0.1, and dra-cpu
installed by `helm install` of charts/dra-cpu (image built by podman). Then, on that node:

1. Pod start latency, create to Running (every container running, as the API server shows it; polled every 20 ms),
   for --pods pods with a 1-CPU claim and --pods pods without one, alternating in one run. Pods run one at a time
   (a 2-CPU machine has one claimable CPU): each is deleted, and its claim unprepared, before the next is created.
   A claim pod's ResourceClaim is created before the clock starts (the pod's time includes the scheduler's
   allocation, NodePrepareResources and the NRI pinning). Goal: median ratio claim / no claim <= 1.15.
2. NodePrepareResources as the kubelet sees it: the time between the kubelet's "Calling NodePrepareResources rpc"
   and "Done calling NodePrepareResources rpc" log lines (--vmodule=dra_plugin=4), p50 and p99; and the driver's own
   dra_cpu_prepare_duration_seconds histogram.
3. The driver daemon's RSS and CPU use while the node is idle for --idle-minutes (RSS sampled every 5 s; CPU from
   /proc/<pid>/stat over the window).

Everything it starts is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from tests.harness.cluster.chart import DriverImage, InstalledDriver  # noqa: E402
from tests.harness.cluster.client import Kube  # noqa: E402
from tests.harness.cluster.control_plane import ALL, ControlPlane  # noqa: E402
from tests.harness.cluster.helm import Helm  # noqa: E402
from tests.harness.cluster.objects import busybox_pod, cpu_claim, new_namespace  # noqa: E402
from tests.harness.cluster.pods import pod_path  # noqa: E402
from tests.harness.nodes.kubelet import container_id  # noqa: E402
from tests.harness.nodes.real import RealNode  # noqa: E402

POLL = 0.02
KLOG_TIME = re.compile(r"^[IWE](\d{4}) (\d{2}:\d{2}:\d{2}\.\d{6})")


def start_latency(kube: Kube, namespace: str, pod: dict[str, Any], timeout: float = 120.0) -> tuple[float, float]:
    """Seconds from the pod's create request to the API server showing it bound to the node (the scheduler's part,
    claim allocation included), and to showing it Running with every container running."""
    start = time.perf_counter()
    kube.create(pod, namespace)
    path = pod_path(namespace, pod["metadata"]["name"])
    deadline = time.monotonic() + timeout
    bound = 0.0
    while True:
        seen = kube.get(path)
        if not bound and seen["spec"].get("nodeName"):
            bound = time.perf_counter() - start
        statuses = seen.get("status", {}).get("containerStatuses", [])
        if (
            seen.get("status", {}).get("phase") == "Running"
            and statuses
            and all(s.get("state", {}).get("running") for s in statuses)
        ):
            return bound or time.perf_counter() - start, time.perf_counter() - start
        if time.monotonic() > deadline:
            raise SystemExit(f"pod {namespace}/{pod['metadata']['name']} not Running after {timeout:.0f} s: {seen}")
        time.sleep(POLL)


def delete_and_wait(kube: Kube, namespace: str, name: str) -> None:
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 1}
    kube.request("DELETE", pod_path(namespace, name), body)
    deadline = time.monotonic() + 120
    while kube.find(pod_path(namespace, name)) is not None:
        if time.monotonic() > deadline:
            raise SystemExit(f"pod {namespace}/{name} not gone after 120 s")
        time.sleep(0.1)


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return (
        f"median {statistics.median(ordered) * 1000:7.0f} ms  p90 {p90 * 1000:7.0f} ms  "
        f"min {ordered[0] * 1000:6.0f} ms  max {ordered[-1] * 1000:6.0f} ms"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def kubelet_prepare_seconds(log: Path, offset: int) -> list[float]:
    """Durations of NodePrepareResources as the kubelet logs them (V(4) of dra_plugin.go), calls one at a time."""
    durations, started = [], None
    for line in log.read_bytes()[offset:].decode(errors="replace").splitlines():
        match = KLOG_TIME.match(line)
        if not match:
            continue
        when = datetime.strptime(f"{match.group(1)} {match.group(2)}", "%m%d %H:%M:%S.%f").timestamp()
        if '"Calling NodePrepareResources rpc"' in line:
            started = when
        elif '"Done calling NodePrepareResources rpc"' in line and started is not None:
            durations.append(when - started)
            started = None
    return durations


def driver_histogram(driver: InstalledDriver[RealNode], name: str) -> dict[float, float]:
    """Upper bound -> cumulative count of a histogram on the driver's /metrics."""
    with urllib.request.urlopen(f"{driver.metrics_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    buckets = {}
    for line in text.splitlines():
        match = re.match(rf'{name}_bucket\{{.*le="([^"]+)".*\}} ([0-9.e+]+)', line)
        if match:
            buckets[float(match.group(1))] = float(match.group(2))
    return buckets


def bucket_quantile(buckets: dict[float, float], q: float) -> str:
    total = max(buckets.values(), default=0)
    if not total:
        return "no observations"
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return f"<= {bound * 1000:g} ms"
    return "> largest bucket"


def daemon_pid(driver: InstalledDriver[RealNode]) -> int:
    pod = driver.ready_pod()
    return int(driver.node.container_info(container_id(pod))["pid"])


def idle_usage(pid: int, minutes: float) -> tuple[float, float, float]:
    """(CPU percent of one CPU, mean RSS MiB, max RSS MiB) of `pid` over `minutes`."""
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    def rss_mib() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    start_cpu, start = cpu_seconds(), time.monotonic()
    samples = [rss_mib()]
    end = start + minutes * 60
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        samples.append(rss_mib())
    used = cpu_seconds() - start_cpu
    return 100 * used / (time.monotonic() - start), statistics.mean(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--pods", type=int, default=20, help="pods of each kind (default 20)")
    parser.add_argument("--idle-minutes", type=float, default=5.0, help="idle window for RSS and CPU (default 5)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the node's kubelet and containerd need it")
    with tempfile.TemporaryDirectory(prefix="dra-cpu-bench-pods-") as tmp:
        t0 = time.monotonic()
        with (
            ControlPlane(Path(tmp) / "control-plane", ALL) as plane,
            DriverImage() as image,
            RealNode(plane, vmodule="dra_plugin=4") as node,
            InstalledDriver(node, Helm.installed(), image.archive) as driver,
        ):
            print(f"control plane, node and driver ready in {time.monotonic() - t0:.0f} s")
            run(node, driver, args.pods, args.idle_minutes)


def run(node: RealNode, driver: InstalledDriver[RealNode], pods: int, idle_minutes: float) -> None:
    kube = node.kube
    namespace = new_namespace(kube, "bench")
    offset = node.log.stat().st_size
    with_claim: list[float] = []
    without: list[float] = []
    bound_claim: list[float] = []
    bound_plain: list[float] = []
    # One warm-up of each kind (first image use, first claim of the class), not counted.
    for i in range(-1, pods):
        for claimed in (True, False):
            name = f"{'claim' if claimed else 'plain'}-{i + 1}"
            if claimed:
                kube.create(cpu_claim(f"c-{i + 1}"), namespace)
                pod = busybox_pod(name, {"cpus": f"c-{i + 1}"})
            else:
                pod = busybox_pod(name)
            bound, seconds = start_latency(kube, namespace, pod)
            if i >= 0:
                (with_claim if claimed else without).append(seconds)
                (bound_claim if claimed else bound_plain).append(bound)
            delete_and_wait(kube, namespace, name)
    print(f"\npod start latency, create to Running, {pods} pods each, one at a time:")
    print(f"  1-CPU claim  {summary(with_claim)}")
    print(f"  no claim     {summary(without)}")
    ratio = statistics.median(with_claim) / statistics.median(without)
    print(f"  ratio of medians claim / no claim: {ratio:.2f} (goal <= 1.15)")
    print("  of which create to bound (the scheduler, with the claim's allocation written to the API server):")
    print(f"    1-CPU claim  {summary(bound_claim)}")
    print(f"    no claim     {summary(bound_plain)}")
    calls = kubelet_prepare_seconds(node.log, offset)[1:]  # the warm-up's call left out
    print(f"\nNodePrepareResources as the kubelet sees it ({len(calls)} calls, from its V(4) log lines):")
    if calls:
        print(
            f"  p50 {percentile(calls, 0.5) * 1000:.1f} ms  p99 {percentile(calls, 0.99) * 1000:.1f} ms  "
            f"max {max(calls) * 1000:.1f} ms"
        )
    buckets = driver_histogram(driver, "dra_cpu_prepare_duration_seconds")
    print(
        f"  the driver's own dra_cpu_prepare_duration_seconds: p50 {bucket_quantile(buckets, 0.5)}, "
        f"p99 {bucket_quantile(buckets, 0.99)} ({max(buckets.values(), default=0):.0f} prepares)"
    )
    pid = daemon_pid(driver)
    print(f"\ndaemon (pid {pid}) idle for {idle_minutes:g} min, no pods on the node ...", flush=True)
    cpu, rss_mean, rss_max = idle_usage(pid, idle_minutes)
    print(f"  CPU {cpu:.2f} % of one CPU; RSS mean {rss_mean:.1f} MiB, max {rss_max:.1f} MiB")
    print(json.dumps({"ratio": round(ratio, 3), "idle_cpu_percent": round(cpu, 3), "rss_max_mib": round(rss_max, 1)}))


if __name__ == "__main__":
    main()
