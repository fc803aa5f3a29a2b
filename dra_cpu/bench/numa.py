"""`dra-cpu bench numa`: bandwidth and latency for every (CPU node, memory node) pair this process may use.

Bandwidth is STREAM's copy and triad in numpy, one thread per CPU of the CPU node, each bound with
sched_setaffinity (which binds the calling thread only) and working on its own slice. Latency is a dependent
pointer chase over a random single-cycle permutation, one cache line per hop, so neither the prefetchers nor
out-of-order execution can overlap the loads; the interpreter's cost per hop, measured on a chain that stays in
L1, is subtracted. Memory comes from mbind before first touch, and numa_maps must confirm it before (and after)
anything is measured.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dra_cpu.bench.extra import MissingExtraError
from dra_cpu.bench.mempolicy import HUGEPAGE_2M_BYTES, BoundBuffer, MemPolicyError
from dra_cpu.bench.numa_maps import Placement, parse_numa_maps, verify_placement
from dra_cpu.bench.report import ONE_NODE_NOTE, NumaParameters, NumaReport, PairResult
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError
from dra_cpu.node.sysfs import read_topology

try:
    import numpy as np
except ImportError:
    raise MissingExtraError("numpy") from None

MIB = 1 << 20
# STREAM's rule: each array at least 4x the sum of all last-level caches, so the figures are DRAM, not cache.
LLC_FACTOR = 4
MIN_ARRAY_BYTES = 256 * MIB
QUICK_ARRAY_BYTES = 64 * MIB
# Arrays per pair (triad's a = b + q*c) and the share of a node's free memory the default size may take.
ARRAYS = 3
FREE_MEMORY_SHARE = 0.5
# Triad is computed in chunks small enough for L2, so numpy's temporary never travels to DRAM and the traffic is
# STREAM's (read b, read c, write a) rather than an extra pass through a temporary array.
TRIAD_CHUNK = 64 * 1024
CACHE_LINE_INT64S = 8
CALIBRATION_LINES = 64
LATENCY_SEED = 20260901
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

Progress = Callable[[str], None]


def parse_size(text: str, field: str = "--size") -> int:
    """`512M`, `1G`, `1GiB` or a byte count; binary units as the kernel counts memory."""
    match = _SIZE.match(text)
    if not match or int(match.group(1)) == 0:
        raise DraCpuError(f"{field} {text!r}: expected a positive size such as 512M or 2G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_mems_allowed(status_text: str) -> CPUSet:
    """The memory nodes this process may allocate from (cpuset.mems, as a pod's claims set it)."""
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key == "Mems_allowed_list":
            return CPUSet.parse(value)
    raise DraCpuError("/proc/self/status: no Mems_allowed_list line")


@dataclass(frozen=True, slots=True)
class Pair:
    cpu_node: int
    cpus: CPUSet
    memory_node: int


def plan_pairs(topology: Topology, cpus: CPUSet, mems: CPUSet) -> list[Pair]:
    """Every (CPU node, memory node) pair reachable with these CPUs and memory nodes, CPU nodes first."""
    cpu_nodes = [(n.id, n.cpus & cpus & topology.online_cpus) for n in topology.numa_nodes]
    memory_nodes = [n.id for n in topology.numa_nodes if n.id in mems and n.memory_bytes > 0]
    return [Pair(node, node_cpus, m) for node, node_cpus in cpu_nodes if node_cpus for m in memory_nodes]


def default_array_bytes(llc_bytes: int, quick: bool) -> int:
    if quick:
        return QUICK_ARRAY_BYTES
    return round_up(max(LLC_FACTOR * llc_bytes, MIN_ARRAY_BYTES), HUGEPAGE_2M_BYTES)


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def read_node_free_bytes(root: Path, node: int, hugepages: bool) -> int:
    node_dir = root / f"sys/devices/system/node/node{node}"
    if hugepages:
        free = node_dir / "hugepages/hugepages-2048kB/free_hugepages"
        return int(free.read_text()) * HUGEPAGE_2M_BYTES if free.exists() else 0
    for line in (node_dir / "meminfo").read_text().splitlines():
        if "MemFree:" in line:
            return int(line.split()[-2]) * 1024
    raise DraCpuError(f"{node_dir / 'meminfo'}: no MemFree line")


def check_fits(array_bytes: int, free_by_node: dict[int, int], hugepages: bool) -> None:
    """Refuse before allocating: a hugetlb fault with no page left on the bound node kills the process (SIGBUS)."""
    need = ARRAYS * array_bytes
    for node, free in sorted(free_by_node.items()):
        if need > free:
            kind = "free 2 MiB hugepages" if hugepages else "free memory"
            raise DraCpuError(
                f"--size {array_bytes // MIB}M: needs {need // MIB} MiB of {kind} on memory node {node}, "
                f"which has {free // MIB} MiB"
            )


# -- measuring (I/O and threads from here on) ---------------------------------------------------------------------


def run_bound(cpus: Sequence[int], work: Callable[[int], None]) -> float:
    """Run work(k) on one thread per CPU, each bound to its CPU; seconds from the first start to the last end."""
    barrier = threading.Barrier(len(cpus))
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * len(cpus)
    errors: list[BaseException] = []

    def body(k: int, cpu: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})
            barrier.wait()
            start = time.perf_counter()
            work(k)
            spans[k] = (start, time.perf_counter())
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(k, cpu)) for k, cpu in enumerate(cpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return max(end for _, end in spans) - min(start for start, _ in spans)


def _bandwidth(cpus: list[int], arrays: Any, iterations: int) -> tuple[float, float]:
    """Best copy and triad GB/s (STREAM reports the best iteration; bytes counted as STREAM counts them)."""
    a, b, c = arrays
    bounds = [a.size * k // len(cpus) for k in range(len(cpus) + 1)]
    slices = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    scratch = [np.empty(TRIAD_CHUNK) for _ in cpus]
    q = 3.0

    def copy(k: int) -> None:
        np.copyto(c[slices[k]], a[slices[k]])

    def triad(k: int) -> None:
        tmp = scratch[k]
        for lo in range(slices[k].start, slices[k].stop, TRIAD_CHUNK):
            hi = min(lo + TRIAD_CHUNK, slices[k].stop)
            part = tmp[: hi - lo]
            np.multiply(c[lo:hi], q, out=part)
            np.add(b[lo:hi], part, out=a[lo:hi])

    best_copy = best_triad = float("inf")
    for _ in range(iterations):
        best_copy = min(best_copy, run_bound(cpus, copy))
        best_triad = min(best_triad, run_bound(cpus, triad))
    return 2 * a.nbytes / best_copy / 1e9, 3 * a.nbytes / best_triad / 1e9


def _link(chain: Any, lines: int, rng: Any) -> None:
    """Make chain[8*i] hold the int64 index of the next line of one random cycle through all `lines` lines."""
    order = rng.permutation(lines)
    following = np.roll(order, -1)
    order *= CACHE_LINE_INT64S
    following *= CACHE_LINE_INT64S
    chain[order] = following


def _chase(view: memoryview, steps: int) -> float:
    """Seconds per hop of `steps` dependent loads (each address is the value loaded before it)."""
    i = 0
    start = time.perf_counter()
    for _ in itertools.repeat(None, steps):
        i = view[i]
    return (time.perf_counter() - start) / steps


def _latency_ns(cpu: int, region: Any, calibration: Any, steps: int, iterations: int) -> float:
    rng = np.random.default_rng(LATENCY_SEED)
    _link(region, region.size // CACHE_LINE_INT64S, rng)
    _link(calibration, CALIBRATION_LINES, rng)
    far, near = memoryview(region), memoryview(calibration)
    samples: list[float] = []

    def measure(_: int) -> None:
        _chase(far, steps // 10)  # warm the page-table caches and the interpreter
        for _ in range(iterations):
            samples.append(_chase(far, steps) - _chase(near, steps))

    run_bound([cpu], measure)
    far.release()
    near.release()
    return sorted(samples)[len(samples) // 2] * 1e9


def _placement(buffer: BoundBuffer) -> Placement:
    entries = parse_numa_maps(Path("/proc/self/numa_maps").read_text(), "/proc/self/numa_maps")
    return verify_placement(entries, buffer.address, buffer.size, buffer.node, buffer.page_size)


def _measure_in(buffer: BoundBuffer, pair: Pair, params: NumaParameters) -> tuple[float, float, float]:
    floats = np.frombuffer(buffer.map, dtype=np.float64)
    n = params.array_bytes // 8
    arrays = (floats[:n], floats[n : 2 * n], floats[2 * n : 3 * n])
    for array in arrays:
        array.fill(1.0)
    copy, triad = _bandwidth(pair.cpus.sorted(), arrays, params.iterations)
    ints = np.frombuffer(buffer.map, dtype=np.int64)
    latency = _latency_ns(
        pair.cpus.first(),
        ints[:n],
        ints[n : n + CALIBRATION_LINES * CACHE_LINE_INT64S],
        params.latency_steps,
        params.iterations,
    )
    return copy, triad, latency


def measure_pair(pair: Pair, params: NumaParameters) -> PairResult:
    base = PairResult(pair.cpu_node, pair.memory_node, pair.cpus)
    try:
        with BoundBuffer(ARRAYS * params.array_bytes, pair.memory_node, hugepages=params.hugepages) as buffer:
            before = _placement(buffer)
            if not before.valid:
                return replace(base, placement=before)
            copy, triad, latency = _measure_in(buffer, pair, params)
            # Checked again: pages can move while measuring (reclaim, migration), which would void the figures.
            return replace(base, placement=_placement(buffer), copy_gbps=copy, triad_gbps=triad, latency_ns=latency)
    except MemPolicyError as err:
        return replace(base, error=str(err))


@dataclass(frozen=True, slots=True)
class NumaOptions:
    size_bytes: int | None
    iterations: int
    latency_steps: int
    hugepages: bool
    quick: bool
    sysfs_root: Path = Path("/")


def run_numa_bench(options: NumaOptions, progress: Progress) -> NumaReport:
    root = options.sysfs_root
    topology = read_topology(root)
    mems = parse_mems_allowed(Path("/proc/self/status").read_text())
    pairs = plan_pairs(topology, CPUSet.of(os.sched_getaffinity(0)), mems)
    if not pairs:
        raise DraCpuError(f"no CPU node with allowed CPUs and memory node in Mems_allowed_list {mems}")
    memory_nodes = sorted({p.memory_node for p in pairs})
    free = {m: read_node_free_bytes(root, m, options.hugepages) for m in memory_nodes}
    notes: list[str] = []
    llc = topology.l3_total_bytes
    if options.size_bytes is not None:
        array_bytes = options.size_bytes
    else:
        wanted = default_array_bytes(llc, options.quick)
        cap = int(min(free.values()) * FREE_MEMORY_SHARE / ARRAYS)
        array_bytes = min(wanted, cap // HUGEPAGE_2M_BYTES * HUGEPAGE_2M_BYTES)
    if options.hugepages:
        array_bytes = round_up(array_bytes, HUGEPAGE_2M_BYTES)
    check_fits(array_bytes, free, options.hugepages)
    if array_bytes < LLC_FACTOR * llc:
        notes.append(
            f"arrays of {array_bytes // MIB} MiB are under {LLC_FACTOR} x L3 = {LLC_FACTOR * llc // MIB} MiB "
            "(STREAM's rule): part of the traffic may be served by the cache"
        )
    if len(memory_nodes) == 1:
        notes.append(ONE_NODE_NOTE)
    params = NumaParameters(array_bytes, options.iterations, options.latency_steps, options.hugepages, options.quick)
    results = []
    for k, pair in enumerate(pairs, 1):
        progress(f"[{k}/{len(pairs)}] cpu node {pair.cpu_node} (cpus {pair.cpus}) -> memory node {pair.memory_node}")
        result = measure_pair(pair, params)
        progress(f"[{k}/{len(pairs)}] " + _summary(result))
        results.append(result)
    return NumaReport(socket.gethostname(), topology.cpu_model, params, tuple(results), tuple(notes))


def _summary(r: PairResult) -> str:
    if not r.valid:
        return f"invalid: {r.reason}"
    return f"copy {r.copy_gbps:.2f} GB/s, triad {r.triad_gbps:.2f} GB/s, latency {r.latency_ns:.1f} ns"
