#!/usr/bin/env python3
"""Prepare and footprint figures, printed. Run from the repository root, as root, after `hack/install.sh --test`
and `hack/install-testenv.sh` (kube-apiserver; containerd for `footprint`):

    .venv/bin/python hack/bench/prepare.py footprint [--tree DIR]... [--rounds 1] [--cycles 10000] [--spaced 200]
    .venv/bin/python hack/bench/prepare.py latency [--claims 1000]
    .venv/bin/python hack/bench/prepare.py soak [--cycles 10000]

footprint  The daemon as the DaemonSet runs it (`python -m dra_cpu run`, NRI enforcement against a real containerd
           with NRI from hack/testenv/containerd.sh, or `--enforcement cdi-hook` without one) against a real
           kube-apiserver (tests/harness/cluster/control_plane.py), the kubelet's calls made over its sockets, 8 claims
           allocated on the server, each reserved for a pod bound to the node with a CPU limit (so that every
           prepare runs the CFS check). Printed, each beside the same run's machine floor:
           - process start -> GetInfo answered (and the CPU time used by then), -> the ResourceSlice published;
             floor: a bare Python gRPC server process started -> its first call answered;
           - RSS and threads after start and after --cycles prepare/unprepare cycles; floor: that server's RSS;
           - NodePrepareResources and NodeUnprepareResources p50/p99, spaced (--spaced cycles; the floor sample
             and the prepare each 100 ms after what came before) and back to back (the --cycles cycles); floor: the
             least a driver's prepare can be, one NodePrepareResources of the same claim by the same stand-in to a
             bare Python gRPC server process whose handler GETs the claim from the API server with the daemon's
             client and makes one fdatasync'd 4 KiB write, one floor sample before each cycle; its parts are
             printed too, each timed alone right after the sample (a round trip to the bare server, a GET, the
             write), and the three in sequence, the floor of the earlier figures in docs/benchmarks.md;
           - the daemon's CPU time per prepare + unprepare (from /proc/<pid>/stat over the back-to-back cycles);
             floor: the floor server's CPU per round trip.
           Goals (docs/benchmarks.md): prepare p50 <= 1.3x floor, p99 <= 2x floor; CPU per prepare + unprepare
           <= 4 ms; RSS <= 60 MiB after start and <= 62 MiB after 10,000 cycles; start -> GetInfo <= 1 s with
           <= 0.4 s of CPU. `--tree DIR` (repeatable) runs the daemon of another checkout of dra-cpu (e.g. a `git
           worktree` of an older commit) with this venv; the trees take turns, --rounds times each, so that a
           before/after comparison sees the same machine load. The load average is printed with each round.
latency    1000 claims through the kubelet socket of a real daemon reading them from the real API server:
           NodePrepareResources p50 (goal <= 3 ms) and p99 (goal <= 10 ms), and the load average when it ended.
soak       10,000 prepare/unprepare cycles against a standalone daemon: leaked files, fds or CPUs (goal none),
           RSS growth (goal <= 5 MB) and daemon RSS (goal <= 70 MB).
The state and kubelet folders are on the disk of /tmp; the CDI folder is on the tmpfs /dev/shm, as /var/run/cdi is
on a node (on the disk, with a note, where /dev/shm is no tmpfs).
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
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import yaml

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from dra_cpu.core.claims import ClaimRef, allocated_claim_object, allocation_result  # noqa: E402
from dra_cpu.kube.kubeconfig import from_kubeconfig  # noqa: E402
from dra_cpu.kube.rest import ApiError, RestClient  # noqa: E402
from dra_cpu.kubelet.client import KubeletClient  # noqa: E402
from dra_cpu.kubelet.gen import pluginregistration_v1_pb2, pluginregistration_v1_pb2_grpc  # noqa: E402
from dra_cpu.store.checkpoint import FILENAME, SPARE  # noqa: E402
from dra_cpu.tools.demo import claim_object  # noqa: E402
from tests.harness.cluster.control_plane import APISERVER_ONLY, ControlPlane  # noqa: E402
from tests.harness.poll import wait_until  # noqa: E402

NODE, DRIVER = "bench-node", "dra.cpu"
FIXTURE = ROOT / "tests/fixtures/sysfs/big-8numa"
CLAIMS_API = "/apis/resource.k8s.io/v1/namespaces/bench/resourceclaims"
DAEMON = """
import sys, logging
from dra_cpu import logs
from dra_cpu.config import Config
from dra_cpu.daemon import Daemon
logs.setup("warning")
# enforcement none with a real API server: only the prepare path is measured (validate() keeps it standalone-only).
Daemon(Config(**{k: v for k, v in (a.split("=", 1) for a in sys.argv[1:])}, enforcement="none")).run()
"""
# The machine floor's gRPC server: one method that answers an empty message, on the pool the daemon's servers use.
FLOOR_SERVER = """
import sys
from concurrent import futures
import grpc
handler = grpc.method_handlers_generic_handler(
    "floor.Floor", {"Ping": grpc.unary_unary_rpc_method_handler(lambda request, context: b"")}
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("unix://" + sys.argv[1])
server.start()
server.wait_for_termination()
"""
# The floor of a prepare: the least a driver's NodePrepareResources can do, in Python, on the same pool (argv:
# socket, kubeconfig, write file): GET each claim the request names with the daemon's API client, make one
# fdatasync'd 4 KiB write, answer. Its GET comes inside the call, as a driver's must: what the API server still does
# after answering a GET (on this machine's cores) then falls inside the call too, as it does in the daemon's.
MINIMAL_PREPARE_SERVER = """
import os, sys
from concurrent import futures
from pathlib import Path
import grpc
from dra_cpu.kube.apiserver import KubeAPI
from dra_cpu.kube.kubeconfig import from_kubeconfig
from dra_cpu.kube.rest import RestClient
from dra_cpu.kubelet.services import DRA_SERVICES
socket, kubeconfig, path = sys.argv[1:]
api = KubeAPI(RestClient(from_kubeconfig(Path(kubeconfig))))
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
for pb2, grpc_mod in DRA_SERVICES.values():
    class Minimal(grpc_mod.DRAPluginServicer):
        def NodePrepareResources(self, request, context, pb2=pb2):
            for claim in request.claims:
                api.get_claim(claim.namespace, claim.name)
            os.pwrite(fd, b"x" * 4096, 0)
            os.fdatasync(fd)
            return pb2.NodePrepareResourcesResponse()
    grpc_mod.add_DRAPluginServicer_to_server(Minimal(), server)
server.add_insecure_port("unix://" + socket)
server.start()
server.wait_for_termination()
"""
SPACED_SECONDS = 0.1


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def tmpfs() -> Path | None:
    """/dev/shm when it is a tmpfs: files there cost no disk writes, like those in a node's /var/run."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    return Path("/dev/shm") if any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts) else None


@contextlib.contextmanager
def cdi_folder(tmp: Path) -> Iterator[Path]:
    shm = tmpfs()
    if shm is None:
        print("note: /dev/shm is no tmpfs; the CDI folder is on the disk, which a node does not do", flush=True)
        yield tmp / "cdi"
        return
    with tempfile.TemporaryDirectory(prefix="dc-cdi-", dir=shm) as cdi:
        yield Path(cdi)


def status_value(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    return status_value(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system time of the whole process, its ended threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def registration_socket(kubelet_root: Path) -> Path:
    return kubelet_root / "plugins_registry" / f"{DRIVER}-reg.sock"


def wait_for_socket(proc: subprocess.Popen[bytes], socket: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start (exit code {proc.poll()})")
        time.sleep(0.002)


@contextlib.contextmanager
def process(args: Sequence[str], cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, cwd=cwd)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def daemon(tmp: Path, **config: str) -> Iterator[tuple[subprocess.Popen[bytes], KubeletClient]]:
    """The DAEMON snippet (enforcement none), registered by a kubelet stand-in."""
    args = {
        "node_name": NODE,
        "sysfs_root": str(FIXTURE),
        "kubelet_root_dir": str(tmp / "kubelet"),
        "cdi_root": str(tmp / "cdi"),
        "state_dir": str(tmp / "state"),
        "metrics_address": "127.0.0.1:0",
        **config,
    }
    with process([sys.executable, "-c", DAEMON, *(f"{k}={v}" for k, v in args.items())]) as proc:
        socket = registration_socket(tmp / "kubelet")
        wait_for_socket(proc, socket, "the daemon", timeout=30)
        kubelet = KubeletClient.register(socket)
        try:
            yield proc, kubelet
        finally:
            kubelet.close()


# ------------------------------------------------------------------------------------------------------------------
# Objects on the API server.


def admin(kubeconfig: Path) -> RestClient:
    return RestClient(from_kubeconfig(kubeconfig))


def create_namespace(api: RestClient, namespace: str) -> None:
    api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
    # No controller manager runs to make the namespace's default service account, which pods need.
    api.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body={"metadata": {"name": "default"}})


def server_claim(api: RestClient, obj: dict[str, Any]) -> ClaimRef:
    """Create the claim `obj` (its status as the scheduler writes it: through the status subresource)."""
    name = obj["metadata"]["name"]
    status = obj.pop("status")
    obj["metadata"] = {"name": name, "namespace": "bench"}
    made = api.request("POST", CLAIMS_API, body=obj)
    made["status"] = status
    api.request("PUT", f"{CLAIMS_API}/{name}/status", body=made)
    return ClaimRef("bench", name, made["metadata"]["uid"])


def bound_pod(api: RestClient, name: str, claim: str) -> tuple[str, str]:
    """A pod bound to the node, using `claim`, with a CPU limit above the claim's: (name, uid)."""
    pod = {
        "metadata": {"name": name},
        "spec": {
            "nodeName": NODE,
            "resourceClaims": [{"name": "cpus", "resourceClaimName": claim}],
            "containers": [
                {"name": "app", "image": "busybox", "resources": {"claims": [{"name": "cpus"}], "limits": {"cpu": "2"}}}
            ],
        },
    }
    made = api.request("POST", "/api/v1/namespaces/bench/pods", body=pod)
    return name, str(made["metadata"]["uid"])


def footprint_claims(api: RestClient) -> list[ClaimRef]:
    """8 claims of 1 CPU, one on each NUMA node of the fixture, each reserved for a pod of its own."""
    refs = []
    for i in range(8):
        pod, pod_uid = bound_pod(api, f"p{i}", f"c{i}")
        key = f"{DRIVER}/cpu"
        result = allocation_result(DRIVER, NODE, f"cpu-numa{i}", consumed={key: "1"}, share_id=str(uuid.uuid4()))
        request = {"name": "cpus", "exactly": {"deviceClassName": DRIVER, "capacity": {"requests": {key: "1"}}}}
        obj = allocated_claim_object("bench", f"c{i}", [result], pod_uids=[pod_uid], requests=[request], node=NODE)
        obj["status"]["reservedFor"][0]["name"] = pod
        refs.append(server_claim(api, obj))
    return refs


# ------------------------------------------------------------------------------------------------------------------
# footprint


@dataclass
class Floor:
    """The machine floor: one prepare of the least a driver can do (MINIMAL_PREPARE_SERVER), and its parts one by
    one: a round trip to a bare gRPC server process, a GET of a claim, an fdatasync'd write."""

    channel: grpc.Channel
    minimal: KubeletClient
    api: RestClient
    claim: str
    file: int
    pid: int
    ping: Callable[[bytes], bytes] = field(init=False)
    # Milliseconds of each part of each sample: the round trip, the GET, the write.
    parts: tuple[list[float], list[float], list[float]] = field(default_factory=lambda: ([], [], []))

    def __post_init__(self) -> None:
        self.ping = self.channel.unary_unary("/floor.Floor/Ping")

    def sample(self, ref: ClaimRef) -> float:
        """Milliseconds of one minimal prepare of `ref`; its parts are timed one by one after it."""
        minimal_ms, _ = timed(partial(self.minimal.prepare, [ref]))
        start = time.perf_counter()
        self.ping(b"")
        pinged = time.perf_counter()
        self.api.request("GET", f"{CLAIMS_API}/{self.claim}")
        got = time.perf_counter()
        os.pwrite(self.file, b"x" * 4096, 0)
        os.fdatasync(self.file)
        end = time.perf_counter()
        for part, ms in zip(self.parts, (pinged - start, got - pinged, end - got), strict=True):
            part.append(ms * 1000)
        return minimal_ms

    def in_sequence(self) -> list[float]:
        """Milliseconds of each sample's three parts one after another (the floor of the earlier figures)."""
        return [sum(sample) for sample in zip(*self.parts, strict=True)]


def answering(call: Callable[[], Any], what: str) -> None:
    """Wait until `call` gets an answer from a server process just started."""
    wait_until(call, f"{what} to answer", interval=0.002, retry_on=(grpc.RpcError,), error=SystemExit)


@contextlib.contextmanager
def floor(tmp: Path, kubeconfig: Path, claim: str) -> Iterator[tuple[Floor, float, float]]:
    """The floor, and its bare server process's start -> first call answered (seconds) and CPU by then."""
    socket, minimal_socket, write = tmp / "floor.sock", tmp / "minimal.sock", tmp / "floor.write"
    start = time.perf_counter()
    with process([sys.executable, "-c", FLOOR_SERVER, str(socket)]) as proc:
        wait_for_socket(proc, socket, "the floor server")
        channel = grpc.insecure_channel(f"unix://{socket}")
        ping = channel.unary_unary("/floor.Floor/Ping")
        answering(lambda: ping(b"", timeout=1), "the floor server")
        started, cpu = time.perf_counter() - start, cpu_seconds(proc.pid)
        minimal_args = [str(minimal_socket), str(kubeconfig), str(tmp / "minimal.write")]
        with process([sys.executable, "-c", MINIMAL_PREPARE_SERVER, *minimal_args]) as minimal_proc:
            wait_for_socket(minimal_proc, minimal_socket, "the minimal prepare server")
            minimal = KubeletClient(None, grpc.insecure_channel(f"unix://{minimal_socket}"), "v1.DRAPlugin")
            answering(lambda: minimal.prepare([], timeout=1), "the minimal prepare server")
            api = admin(kubeconfig)
            fd = os.open(write, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                yield Floor(channel, minimal, api, claim, fd, proc.pid), started, cpu
            finally:
                os.close(fd)
                api.close()
                minimal.close()
                channel.close()


@dataclass
class Run:
    """The figures of one daemon's run."""

    tree: str
    load: float = 0.0
    figures: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (value, floor)


def get_info(socket: Path) -> bool:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = pluginregistration_v1_pb2_grpc.RegistrationStub(channel)
        try:
            stub.GetInfo(pluginregistration_v1_pb2.InfoRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return True


def slices_published(api: RestClient) -> bool:
    listed = api.request("GET", "/apis/resource.k8s.io/v1/resourceslices", {"fieldSelector": f"spec.nodeName={NODE}"})
    return bool(listed["items"])


def delete_slices(api: RestClient) -> None:
    listed = api.request("GET", "/apis/resource.k8s.io/v1/resourceslices", {"fieldSelector": f"spec.nodeName={NODE}"})
    for item in listed["items"]:
        with contextlib.suppress(ApiError):
            api.request("DELETE", f"/apis/resource.k8s.io/v1/resourceslices/{item['metadata']['name']}")


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    answer = call()
    return (time.perf_counter() - start) * 1000, answer


def cycles(
    kubelet: KubeletClient, refs: list[ClaimRef], fl: Floor, count: int, pid: int, gap: float
) -> tuple[list[float], list[float], list[float], float, float]:
    """`count` prepare + unprepare cycles over `refs`, a floor sample before each: the prepare, unprepare and floor
    times (ms), and the daemon's CPU seconds spent in prepares and in unprepares. With a `gap` (seconds), the floor
    sample and the prepare each come that long after what came before them: both find the machine as idle."""
    prepares, unprepares, floors = [], [], []
    cpu_prepare = cpu_unprepare = 0.0
    for n in range(count):
        ref = refs[n % len(refs)]
        if gap:
            time.sleep(gap)
        floors.append(fl.sample(ref))
        if gap:
            time.sleep(gap)
        before = cpu_seconds(pid)
        ms, answer = timed(partial(kubelet.prepare, [ref]))
        middle = cpu_seconds(pid)
        if answer.claims[ref.uid].error:
            raise SystemExit(f"prepare failed: {answer.claims[ref.uid].error}")
        prepares.append(ms)
        ms, answer = timed(partial(kubelet.unprepare, [ref]))
        unprepares.append(ms)
        cpu_prepare, cpu_unprepare = cpu_prepare + middle - before, cpu_unprepare + cpu_seconds(pid) - middle
        if answer.claims[ref.uid].error:
            raise SystemExit(f"unprepare failed: {answer.claims[ref.uid].error}")
    return prepares, unprepares, floors, cpu_prepare, cpu_unprepare


@contextlib.contextmanager
def enforcement(tmp: Path, containerd: str) -> Iterator[list[str]]:
    """The daemon's enforcement flags: NRI of a containerd of its own, started for the run, or the CDI hook."""
    if containerd == "none":
        yield ["--enforcement", "cdi-hook"]
        return
    script, where = ROOT / "hack/testenv/containerd.sh", tmp / "containerd"
    subprocess.run(["bash", str(script), "start", containerd, str(where)], check=True, capture_output=True)
    try:
        yield ["--enforcement", "nri", "--nri-socket", str(where / "nri" / "nri.sock")]
    finally:
        subprocess.run(["bash", str(script), "stop", containerd, str(where)], check=False, capture_output=True)


def footprint_run(tree: Path, tmp: Path, plane_kubeconfig: Path, refs: list[ClaimRef], args: argparse.Namespace) -> Run:
    run = Run(str(tree))
    api = admin(plane_kubeconfig)
    delete_slices(api)
    kubelet_root = tmp / "kubelet"
    try:
        with (
            enforcement(tmp, args.containerd) as enforcing,
            cdi_folder(tmp) as cdi,
            floor(tmp, plane_kubeconfig, refs[0].name) as (fl, floor_start, floor_cpu),
        ):
            command = [
                sys.executable, "-m", "dra_cpu", "run", "--kubeconfig", str(plane_kubeconfig), "--node-name", NODE,
                "--sysfs-root", str(FIXTURE), "--kubelet-root-dir", str(kubelet_root), "--cdi-root", str(cdi),
                "--state-dir", str(tmp / "state"), "--metrics-address", "127.0.0.1:0", "--log-level", "warning",
                *enforcing,
            ]  # fmt: skip
            start = time.perf_counter()
            with process(command, cwd=tree) as proc:
                socket = registration_socket(kubelet_root)
                published: list[float] = []

                def watch_slices() -> None:
                    while not slices_published(api):
                        time.sleep(0.005)
                    published.append(time.perf_counter() - start)

                watcher = threading.Thread(target=watch_slices, daemon=True)
                watcher.start()
                wait_for_socket(proc, socket, "the daemon")
                while not get_info(socket):
                    time.sleep(0.002)
                to_info, info_cpu = time.perf_counter() - start, cpu_seconds(proc.pid)
                watcher.join(timeout=60)
                kubelet = KubeletClient.register(socket)
                time.sleep(2)  # settle: what start-up made and freed is counted once
                pid = proc.pid
                floor_rss = rss_kib(fl.pid) / 1024
                figures = run.figures
                figures["start -> GetInfo answered (s)"] = (to_info, floor_start)
                figures["CPU by GetInfo (s)"] = (info_cpu, floor_cpu)
                figures["start -> slice published (s)"] = (published[0] if published else float("nan"), floor_start)
                figures["RSS after start (MiB)"] = (rss_kib(pid) / 1024, floor_rss)
                figures["threads after start"] = (status_value(pid, "Threads"), status_value(fl.pid, "Threads"))
                try:
                    spaced = cycles(kubelet, refs, fl, args.spaced, pid, SPACED_SECONDS)
                    floor_cpu_before = cpu_seconds(fl.pid)
                    back = cycles(kubelet, refs, fl, args.cycles, pid, 0.0)
                    floor_cpu_per_call = (cpu_seconds(fl.pid) - floor_cpu_before) / args.cycles * 1000
                    figures["RSS after cycles (MiB)"] = (rss_kib(pid) / 1024, rss_kib(fl.pid) / 1024)
                    figures["threads after cycles"] = (status_value(pid, "Threads"), status_value(fl.pid, "Threads"))
                finally:
                    kubelet.close()
                floor_p50 = statistics.median(spaced[2] + back[2])  # the parts are of every sample too
                for part, samples in zip(
                    ("gRPC round trip", "GET of a claim", "fdatasync'd write", "the three in sequence"),
                    (*fl.parts, fl.in_sequence()),
                    strict=True,
                ):
                    figures[f"floor part: {part} p50 (ms)"] = (statistics.median(samples), floor_p50)
                for label, (prepares, unprepares, floors, _, _) in (("spaced", spaced), ("back to back", back)):
                    for p in (50, 99):
                        figures[f"prepare p{p}, {label} (ms)"] = (percentile(prepares, p), percentile(floors, p))
                        figures[f"unprepare p{p}, {label} (ms)"] = (percentile(unprepares, p), percentile(floors, p))
                _, _, _, cpu_prepare, cpu_unprepare = back
                per_cycle = (cpu_prepare + cpu_unprepare) / args.cycles * 1000
                figures["CPU per prepare (ms)"] = (cpu_prepare / args.cycles * 1000, floor_cpu_per_call)
                figures["CPU per unprepare (ms)"] = (cpu_unprepare / args.cycles * 1000, floor_cpu_per_call)
                figures["CPU per prepare + unprepare (ms)"] = (per_cycle, 2 * floor_cpu_per_call)
    finally:
        api.close()
    run.load = os.getloadavg()[0]
    return run


GOALS = {
    "start -> GetInfo answered (s)": "<= 1",
    "CPU by GetInfo (s)": "<= 0.4",
    "RSS after start (MiB)": "<= 60",
    "RSS after cycles (MiB)": "<= 62",
    "prepare p50, spaced (ms)": "<= 1.3x floor",
    "prepare p99, spaced (ms)": "<= 2x floor",
    "prepare p50, back to back (ms)": "<= 1.3x floor",
    "prepare p99, back to back (ms)": "<= 2x floor",
    "CPU per prepare + unprepare (ms)": "<= 4",
}


def print_runs(runs: list[Run], cycles_count: int) -> None:
    trees = sorted({r.tree for r in runs}, key=[r.tree for r in runs].index)
    names = list(runs[0].figures)
    print(f"\nfootprint ({cycles_count} back-to-back cycles; value / same run's floor = ratio):")
    for tree in trees:
        mine = [r for r in runs if r.tree == tree]
        loads = ", ".join(f"{r.load:.2f}" for r in mine)
        print(f"\n  daemon of {tree} ({len(mine)} run{'s' if len(mine) > 1 else ''}, load average {loads}):")
        for name in names:
            values = [r.figures[name] for r in mine]
            value, base = statistics.median(v for v, _ in values), statistics.median(f for _, f in values)
            ratio = f"{value / base:5.2f}x" if base else "   - "
            print(f"    {name:36} {value:9.2f}  floor {base:8.2f}  {ratio}  {GOALS.get(name, '')}")
    print(json.dumps([{"tree": r.tree, "load": r.load, "figures": r.figures} for r in runs]))


def footprint(args: argparse.Namespace) -> bool:
    trees = [Path(t).resolve() for t in args.tree] or [ROOT]
    for tree in trees:
        if not (tree / "dra_cpu" / "__main__.py").is_file():
            raise SystemExit(f"--tree {tree}: no dra_cpu package there")
        # As an installed package is: start-up times then exclude compiling changed sources.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "dra_cpu")], check=True)
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="dc-") as tmp_text,
        ControlPlane(Path(tmp_text) / "api", APISERVER_ONLY) as plane,
    ):
        api = admin(plane.kubeconfig)
        create_namespace(api, "bench")
        refs = footprint_claims(api)
        api.close()
        for round_number in range(args.rounds):
            for n, tree in enumerate(trees):
                print(f"round {round_number + 1}, daemon of {tree} ...", flush=True)
                with tempfile.TemporaryDirectory(prefix=f"dc-{n}-") as run_tmp:
                    runs.append(footprint_run(tree, Path(run_tmp), plane.kubeconfig, refs, args))
    print_runs(runs, args.cycles)
    return True


# ------------------------------------------------------------------------------------------------------------------
# latency and soak


def latency(claims: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="dc-") as tmp_text:
        tmp = Path(tmp_text)
        with ControlPlane(tmp / "api", APISERVER_ONLY) as plane, cdi_folder(tmp) as cdi:
            api = admin(plane.kubeconfig)
            create_namespace(api, "bench")
            print(f"creating {claims} allocated claims on the API server ...", flush=True)
            refs = []
            for i in range(claims):
                obj = claim_object(f"c{i}", "", NODE, DRIVER, f"cpu-numa{i % 8}", 1, str(uuid.uuid4()))
                refs.append(server_claim(api, obj))
            api.close()
            with daemon(tmp, kubeconfig=str(plane.kubeconfig), cdi_root=str(cdi)) as (_, kubelet):
                times = []
                for n, ref in enumerate(refs):
                    if n and n % 56 == 0:
                        # cpu-numa0 publishes 7 of its 8 CPUs (CPU 0 stays shared): 7 claims per device, then the
                        # batch is released before the next.
                        kubelet.unprepare(refs[n - 56 : n])
                    ms, answer = timed(partial(kubelet.prepare, [ref]))
                    response = answer.claims[ref.uid]
                    times.append(ms)
                    if response.error:
                        raise SystemExit(f"prepare failed: {response.error}")
    p50, p99 = statistics.median(times), percentile(times, 99)
    print(f"NodePrepareResources over {claims} claims (real API server), load average {os.getloadavg()[0]:.2f}:")
    print(f"  p50 {p50:.2f} ms (goal <= 3), p99 {p99:.2f} ms (goal <= 10)")
    return p50 <= 3 and p99 <= 10


def soak(cycles_count: int) -> bool:
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
        with daemon(tmp, standalone=str(cluster)) as (proc, kubelet):

            def cycle(n: int) -> None:
                ref = refs[n % len(refs)]
                assert not kubelet.prepare([ref]).claims[ref.uid].error
                assert not kubelet.unprepare([ref]).claims[ref.uid].error

            for n in range(200):
                cycle(n)
            rss0, fds0 = rss_kib(proc.pid), len(os.listdir(f"/proc/{proc.pid}/fd"))
            start = time.perf_counter()
            for n in range(cycles_count):
                cycle(n)
            elapsed = time.perf_counter() - start
            rss1, fds1 = rss_kib(proc.pid), len(os.listdir(f"/proc/{proc.pid}/fd"))
            specs = list((tmp / "cdi").glob("*.json"))
            state = json.loads((tmp / "state" / FILENAME).read_text())
            stray = [p.name for p in (tmp / "state").iterdir() if p.name not in (FILENAME, SPARE)]
            metadata_dir = tmp / "kubelet/plugins" / DRIVER / "dra-device-metadata"
            metadata = sorted(p.name for p in metadata_dir.iterdir()) if metadata_dir.exists() else []
    growth = (rss1 - rss0) / 1024
    print(
        f"{cycles_count} prepare/unprepare cycles in {elapsed:.1f} s ({elapsed / cycles_count * 1000:.2f} ms per cycle)"
    )
    print(f"  RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB (growth {growth:+.1f} MiB, goal <= 5; daemon goal <= 70)")
    print(f"  fds {fds0} -> {fds1}; CDI specs left {len(specs)}; claims in checkpoint {len(state['claims'])}")
    print(f"  stray state files {stray}; device metadata files left {metadata}")
    return (
        growth <= 5
        and rss1 / 1024 <= 70
        and fds1 <= fds0
        and not specs
        and not state["claims"]
        and not stray
        and not metadata
    )


def default_containerd() -> str:
    """The first containerd the test environment has, or "none" (then enforcement is cdi-hook)."""
    found = subprocess.run(
        ["bash", str(ROOT / "hack/testenv/containerd.sh"), "versions"], capture_output=True, text=True, check=False
    )
    versions = found.stdout.split()
    cache = Path(os.environ.get("TESTENV_CACHE", "/var/cache/dra-cpu-testenv"))
    installed = [v for v in versions if (cache / f"containerd-{v}/usr/bin/containerd").exists()]
    return installed[0] if installed and os.geteuid() == 0 else "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["footprint", "latency", "soak", "all"])
    parser.add_argument("--claims", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=10000)
    parser.add_argument("--spaced", type=int, default=200, help="footprint: spaced cycles, 100 ms apart")
    parser.add_argument("--tree", action="append", default=[], help="footprint: a checkout whose daemon to run")
    parser.add_argument("--rounds", type=int, default=1, help="footprint: runs of each tree, taking turns")
    parser.add_argument(
        "--containerd", default=None, help="footprint: containerd version for NRI, or none (enforcement cdi-hook)"
    )
    args = parser.parse_args()
    if args.containerd is None:
        args.containerd = default_containerd()
    ok = True
    if args.what in ("footprint", "all"):
        ok = footprint(args) and ok
    if args.what in ("latency", "all"):
        ok = latency(args.claims) and ok
    if args.what in ("soak", "all"):
        ok = soak(args.cycles) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
