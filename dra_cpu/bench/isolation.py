"""`dra-cpu bench isolation`: a latency-sensitive probe alone, beside a noisy neighbour, and on exclusive CPUs.

The probe does what cyclictest does with an ordinary (SCHED_OTHER) task, as pod workloads are: it sleeps to
absolute deadlines every interval and records how late it woke, then runs a fixed compute kernel and records how
long it took. The neighbour is one memory-copying hog per CPU (CPU time and memory bandwidth at once), so the load is
the same in the shared and the exclusive case and only the placement differs. As root with a writable cgroup
cpuset hierarchy (v1 or v2) the probe and the neighbour each get a cpuset of their own, as the driver would give
them; elsewhere (inside a pod) sched_setaffinity splits the CPUs that the claims gave.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path

from dra_cpu.bench.report import IsolationCase, IsolationReport
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError
from dra_cpu.node.cgroups import CGROUP_ROOT, Cpusets, find_cpuset_hierarchy

KERNEL_BYTES = 256 * 1024
HOG_BYTES = 64 * 1024 * 1024
PR_SET_TIMERSLACK = 29
CPU_DMA_LATENCY = Path("/dev/cpu_dma_latency")

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class IsolationOptions:
    probe_cpus: CPUSet | None
    seconds_per_case: float
    interval_us: int
    enforce: str  # auto, cgroup or affinity


def split_cpus(allowed: CPUSet, probe: CPUSet | None) -> tuple[CPUSet, CPUSet]:
    """Probe and neighbour CPUs; by default the probe takes the last allowed CPU (CPU 0 takes most interrupts)."""
    if len(allowed) < 2:
        raise DraCpuError(f"allowed CPUs {allowed or '(none)'}: the isolation bench needs at least 2")
    chosen = probe if probe is not None else CPUSet.of([allowed.sorted()[-1]])
    if not chosen or not chosen.issubset(allowed):
        raise DraCpuError(f"--probe-cpus {chosen}: must be a non-empty subset of the allowed CPUs {allowed}")
    rest = allowed - chosen
    if not rest:
        raise DraCpuError(f"--probe-cpus {chosen}: leaves no CPU for the neighbour among allowed CPUs {allowed}")
    return chosen, rest


# -- the probe and the neighbour (run in child processes) ---------------------------------------------------------


def _probe(
    conn: multiprocessing.connection.Connection, cpus: CPUSet | None, interval_ns: int, seconds: float, go: Event
) -> None:
    go.wait()
    if cpus is not None:
        os.sched_setaffinity(0, cpus.ids)
    # The default 50 us timer slack would be added to every wake-up; cyclictest removes it the same way.
    ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    data = os.urandom(KERNEL_BYTES)
    wakeups: list[int] = []
    compute: list[int] = []
    now = time.monotonic_ns()
    deadline, end = now + interval_ns, now + int(seconds * 1e9)
    while now < end:
        time.sleep((deadline - now) / 1e9)  # CPython sleeps to an absolute CLOCK_MONOTONIC deadline
        woke = time.monotonic_ns()
        wakeups.append(woke - deadline)
        hashlib.sha256(data).digest()
        now = time.monotonic_ns()
        compute.append(now - woke)
        # Ticks missed while computing are skipped, so every sample is a real sleep, as in cyclictest.
        deadline += max(1, (now - deadline) // interval_ns + 1) * interval_ns
    conn.send((wakeups, compute))
    conn.close()


def _hog(cpu: int | None, go: Event, stop: Event) -> None:
    go.wait()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    source, target = bytearray(HOG_BYTES), bytearray(HOG_BYTES)
    while not stop.is_set():
        target[:] = source


@contextmanager
def _enforcement(options: IsolationOptions, progress: Progress) -> Iterator[Cpusets | None]:
    hierarchy = None
    if options.enforce != "affinity" and os.geteuid() == 0:
        hierarchy = find_cpuset_hierarchy(CGROUP_ROOT, Path("/proc/self/cgroup").read_text())
    if hierarchy is None:
        if options.enforce == "cgroup":
            raise DraCpuError("--enforce cgroup: no writable cpuset cgroup hierarchy (run as root on the node)")
        yield None
        return
    progress(f"cpusets: {hierarchy.name} under {hierarchy.parent}")
    cpusets = Cpusets(hierarchy, f"dra-cpu-bench-{os.getpid()}")
    try:
        yield cpusets
    finally:
        cpusets.close()


@contextmanager
def _shallow_idle() -> Iterator[bool]:
    """Hold a 0 us PM QoS request, as cyclictest does, so deep idle states do not add their exit latency to
    wake-ups; the kernel drops the request when the file is closed. False where it cannot (not root, in a pod)."""
    try:
        request = CPU_DMA_LATENCY.open("wb", buffering=0)
    except OSError:
        yield False
        return
    with request:
        request.write((0).to_bytes(4, "little"))
        yield True


# -- running the cases ---------------------------------------------------------------------------------------------


def _run_case(
    name: str,
    probe_cpus: CPUSet,
    hog_cpus: CPUSet,
    hogs: int,
    cpusets: Cpusets | None,
    options: IsolationOptions,
) -> IsolationCase:
    ctx = multiprocessing.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    receiver, sender = ctx.Pipe(duplex=False)
    affinity = None if cpusets is not None else probe_cpus
    probe = ctx.Process(
        target=_probe, args=(sender, affinity, options.interval_us * 1000, options.seconds_per_case, go), daemon=True
    )
    # One hog per CPU, each pinned to one CPU of the neighbour's set, so each of those CPUs carries the same load.
    targets = [hog_cpus.sorted()[k % len(hog_cpus)] for k in range(hogs)] if hog_cpus else []
    neighbours = [ctx.Process(target=_hog, args=(cpu, go, stop), daemon=True) for cpu in targets]
    processes = [probe, *neighbours]
    try:
        for process in processes:
            process.start()
        if cpusets is not None:
            cpusets.place("probe", probe_cpus, [_pid(probe)])
            if neighbours:
                cpusets.place("neighbour", hog_cpus, [_pid(p) for p in neighbours])
        go.set()
        wakeups, compute = receiver.recv()
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return IsolationCase(name, probe_cpus, hog_cpus, tuple(wakeups), tuple(compute))


def _pid(process: multiprocessing.process.BaseProcess) -> int:
    if process.pid is None:
        raise DraCpuError("a benchmark process did not start")
    return process.pid


def run_isolation_bench(options: IsolationOptions, progress: Progress) -> IsolationReport:
    allowed = CPUSet.of(os.sched_getaffinity(0))
    probe_cpus, rest = split_cpus(allowed, options.probe_cpus)
    hogs = len(allowed)
    plan = [("alone", CPUSet()), ("shared", allowed), ("exclusive", rest)]
    notes = []
    load_before = os.getloadavg()[0]
    with _enforcement(options, progress) as cpusets, _shallow_idle() as shallow:
        if not shallow:
            notes.append(f"could not hold {CPU_DMA_LATENCY} at 0: CPU idle states may add to wake-up latency")
        enforcement = cpusets.hierarchy.name if cpusets is not None else "sched_setaffinity"
        if cpusets is None:
            notes.append("no writable cpuset cgroup: CPUs split with sched_setaffinity among the allowed ones")
        cases = []
        for k, (name, hog_cpus) in enumerate(plan, 1):
            progress(f"[{k}/{len(plan)}] {name}: probe on {probe_cpus}, neighbour on {hog_cpus or 'none'}")
            case = _run_case(name, probe_cpus, hog_cpus, hogs if hog_cpus else 0, cpusets, options)
            progress(
                f"[{k}/{len(plan)}] {name}: wake-up p99 {case.wakeup.p99:.1f} us, compute p99 {case.compute.p99:.1f} us"
            )
            cases.append(case)
    load_after = os.getloadavg()[0]
    # The bench's own load is one probe plus one hog per CPU; more than that came from elsewhere.
    if max(load_before, load_after) > len(allowed) + 1:
        notes.append(
            f"the machine was busy (load average up to {max(load_before, load_after):.1f} on {len(allowed)} CPUs): "
            "processes outside this bench are not kept off the probe's CPUs and add latency to every case"
        )
    return IsolationReport(
        socket.gethostname(),
        enforcement,
        options.interval_us,
        options.seconds_per_case,
        hogs,
        tuple(cases),
        (load_before, load_after),
        tuple(notes),
    )
