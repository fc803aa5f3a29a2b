#!/usr/bin/env python3
"""Prepare figures, printed (run with .venv/bin/python):

latency  1000 claims through the kubelet socket of a real daemon reading them from the real API server
         (kube-apiserver from tests/harness/cluster/control_plane.py): NodePrepareResources p50 (goal <= 3 ms) and
         p99 (goal <= 10 ms), and the load average when it ended. The state and kubelet folders are on the disk
         of /tmp; the CDI folder is on the tmpfs /dev/shm, as /var/run/cdi is on a node (on the disk, with a
         note, where /dev/shm is no tmpfs).
soak     10,000 prepare/unprepare cycles against a standalone daemon: leaked files, fds or CPUs (goal none),
         RSS growth (goal <= 5 MB) and daemon RSS (goal <= 70 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from dra_cpu.core.claims import ClaimRef  # noqa: E402
from dra_cpu.kubelet.client import KubeletClient  # noqa: E402
from dra_cpu.store.checkpoint import FILENAME, SPARE  # noqa: E402
from dra_cpu.tools.demo import claim_object  # noqa: E402
from tests.harness.cluster.client import close_api_client, new_api_client  # noqa: E402
from tests.harness.cluster.control_plane import APISERVER_ONLY, ControlPlane  # noqa: E402
from tests.harness.cluster.objects import create_namespace  # noqa: E402
from tests.harness.typed import as_dict  # noqa: E402

NODE, DRIVER = "bench-node", "dra.cpu"
DAEMON = """
import sys, logging
from dra_cpu import logs
from dra_cpu.config import Config
from dra_cpu.daemon import Daemon
logs.setup("warning")
# enforcement none with a real API server: only the prepare path is measured (validate() keeps it standalone-only).
Daemon(Config(**{k: v for k, v in (a.split("=", 1) for a in sys.argv[1:])}, enforcement="none")).run()
"""


@contextlib.contextmanager
def daemon(tmp: Path, **config: str) -> Iterator[tuple[subprocess.Popen[bytes], KubeletClient, Path]]:
    args = {
        "node_name": NODE,
        "sysfs_root": str(ROOT / "tests/fixtures/sysfs/big-8numa"),
        "kubelet_root_dir": str(tmp / "kubelet"),
        "cdi_root": str(tmp / "cdi"),
        "state_dir": str(tmp / "state"),
        "metrics_address": "127.0.0.1:0",
        **config,
    }
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, *(f"{k}={v}" for k, v in args.items())], cwd=ROOT)
    socket = tmp / "kubelet/plugins_registry" / f"{DRIVER}-reg.sock"
    deadline = time.monotonic() + 30
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the daemon did not start")
        time.sleep(0.05)
    kubelet = KubeletClient.register(socket)
    try:
        yield proc, kubelet, tmp
    finally:
        kubelet.close()
        proc.terminate()
        proc.wait(timeout=30)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def tmpfs() -> Path | None:
    """/dev/shm when it is a tmpfs: files there cost no disk writes, like those in a node's /var/run."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    return Path("/dev/shm") if any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts) else None


def latency(claims: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="dc-") as tmp_text, contextlib.ExitStack() as stack:
        tmp = Path(tmp_text)
        shm = tmpfs()
        if shm is None:
            print("note: /dev/shm is no tmpfs; the CDI folder is on the disk, which a node does not do", flush=True)
        cdi = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dc-cdi-", dir=shm))) if shm else tmp / "cdi"
        with ControlPlane(tmp / "api", APISERVER_ONLY) as plane:
            kubeconfig = str(plane.kubeconfig)
            api_client = new_api_client(plane.kubeconfig)
            create_namespace(api_client, "bench")
            api = kubernetes.client.CustomObjectsApi(api_client)
            print(f"creating {claims} allocated claims on the API server ...", flush=True)
            refs = []
            for i in range(claims):
                obj = claim_object(f"c{i}", "", NODE, DRIVER, f"cpu-numa{i % 8}", 1, str(uuid.uuid4()))
                status = obj.pop("status")
                obj["metadata"] = {"name": f"c{i}", "namespace": "bench"}
                made = as_dict(
                    api.create_namespaced_custom_object("resource.k8s.io", "v1", "bench", "resourceclaims", obj)
                )
                made["status"] = status
                api.replace_namespaced_custom_object_status(
                    "resource.k8s.io", "v1", "bench", "resourceclaims", f"c{i}", made
                )
                refs.append(ClaimRef("bench", f"c{i}", made["metadata"]["uid"]))
            close_api_client(api_client)
            with daemon(tmp, kubeconfig=kubeconfig, cdi_root=str(cdi)) as (_, kubelet, _):
                times = []
                for n, ref in enumerate(refs):
                    if n and n % 56 == 0:
                        # cpu-numa0 publishes 7 of its 8 CPUs (CPU 0 stays shared): 7 claims per device, then the
                        # batch is released before the next.
                        kubelet.unprepare(refs[n - 56 : n])
                    start = time.perf_counter()
                    response = kubelet.prepare([ref]).claims[ref.uid]
                    times.append((time.perf_counter() - start) * 1000)
                    if response.error:
                        raise SystemExit(f"prepare failed: {response.error}")
    p50, p99 = statistics.median(times), percentile(times, 99)
    print(f"NodePrepareResources over {claims} claims (real API server), load average {os.getloadavg()[0]:.2f}:")
    print(f"  p50 {p50:.2f} ms (goal <= 3), p99 {p99:.2f} ms (goal <= 10)")
    return p50 <= 3 and p99 <= 10


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def soak(cycles: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="dc-") as tmp_text:
        tmp = Path(tmp_text)
        cluster = tmp / "cluster"
        refs = []
        for i in range(8):
            obj = claim_object(f"c{i}", str(uuid.uuid4()), NODE, DRIVER, f"cpu-numa{i}", 3, str(uuid.uuid4()))
            path = cluster / "resourceclaims/default" / f"c{i}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(obj))
            refs.append(ClaimRef("default", f"c{i}", obj["metadata"]["uid"]))
        with daemon(tmp, standalone=str(cluster)) as (proc, kubelet, _):

            def cycle(n: int) -> None:
                ref = refs[n % len(refs)]
                assert not kubelet.prepare([ref]).claims[ref.uid].error
                assert not kubelet.unprepare([ref]).claims[ref.uid].error

            for n in range(200):
                cycle(n)
            rss0, fds0 = rss_kib(proc.pid), len(os.listdir(f"/proc/{proc.pid}/fd"))
            start = time.perf_counter()
            for n in range(cycles):
                cycle(n)
            elapsed = time.perf_counter() - start
            rss1, fds1 = rss_kib(proc.pid), len(os.listdir(f"/proc/{proc.pid}/fd"))
            specs = list((tmp / "cdi").glob("*.json"))
            state = json.loads((tmp / "state" / FILENAME).read_text())
            stray = [p.name for p in (tmp / "state").iterdir() if p.name not in (FILENAME, SPARE)]
            metadata_dir = tmp / "kubelet/plugins" / DRIVER / "dra-device-metadata"
            metadata = sorted(p.name for p in metadata_dir.iterdir()) if metadata_dir.exists() else []
    growth = (rss1 - rss0) / 1024
    print(f"{cycles} prepare/unprepare cycles in {elapsed:.1f} s ({elapsed / cycles * 1000:.2f} ms per cycle)")
    print(f"  RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB (growth {growth:+.1f} MiB, goal <= 5; daemon goal <= 70)")
    print(f"  fds {fds0} -> {fds1}; CDI specs left {len(specs)}; claims in checkpoint {len(state['claims'])}")
    print(f"  stray state files {stray}; device metadata folders left {metadata}")
    return (
        growth <= 5
        and rss1 / 1024 <= 70
        and fds1 <= fds0
        and not specs
        and not state["claims"]
        and not stray
        and not metadata
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["latency", "soak", "all"])
    parser.add_argument("--claims", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=10000)
    args = parser.parse_args()
    ok = True
    if args.what in ("latency", "all"):
        ok = latency(args.claims) and ok
    if args.what in ("soak", "all"):
        ok = soak(args.cycles) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
