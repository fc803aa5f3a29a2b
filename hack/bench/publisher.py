#!/usr/bin/env python3
"""Prints what publishing ResourceSlices costs: building the slices of the 64-CPU fixture in every device mode,
grouping and node-allocatable setting (goal <= 20 ms each, median of 20), API writes by a running publisher while
nothing changes (goal 0), and how long a slice deleted by another client stays away (goal <= 1 s, median of 20).
Starts its own kube-apiserver (tests/harness/cluster/control_plane.py; run `hack/testenv/kubernetes.sh install` once);
with --build-only it needs none. Run with .venv/bin/python hack/bench/publisher.py [--idle-seconds N] [--build-only]."""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dra_cpu.core.devices import DeviceConfig, DeviceMode, GroupBy, build_devices, build_slices
from dra_cpu.core.topology import Topology
from dra_cpu.kube.apiserver import GROUP, SLICES, VERSION, KubeAPI, connect
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.node.sysfs import read_topology

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/sysfs/big-8numa"
sys.path.insert(0, str(ROOT))  # for tests.harness

from tests.harness.cluster.control_plane import APISERVER_ONLY, ControlPlane, ControlPlaneError  # noqa: E402
from tests.harness.component import Unavailable  # noqa: E402


def median_ms(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def build(topology: Topology, config: DeviceConfig) -> list[dict[str, Any]]:
    return build_slices(build_devices(topology, config), config)


def versions(api: KubeAPI, config: DeviceConfig) -> dict[str, str]:
    return {
        s["metadata"]["name"]: s["metadata"]["resourceVersion"]
        for s in api.list_slices(config.driver_name, config.node_name)
    }


def idle_writes(api: KubeAPI, publisher: SlicePublisher, config: DeviceConfig, seconds: float) -> tuple[int, int]:
    """Slices the server saw change (resourceVersions) and writes the publisher counted, over `seconds`."""
    before, counted = versions(api, config), publisher.writes
    time.sleep(seconds)
    after = versions(api, config)
    changed = sum(1 for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    return changed, publisher.writes - counted


def republish_ms(api: KubeAPI, config: DeviceConfig) -> float:
    """From the DELETE of another client until the slice can be read again."""
    [name] = versions(api, config)
    objects = client.CustomObjectsApi(api.api_client)
    start = time.perf_counter()
    api.delete_slice(name)
    while True:
        try:
            objects.get_cluster_custom_object(GROUP, VERSION, SLICES, name)
            return (time.perf_counter() - start) * 1000
        except ApiException as err:  # 404 until the publisher has written it again
            if err.status != 404:
                raise
        time.sleep(0.002)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=300.0, help="how long to watch an idle publisher")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--build-only", action="store_true", help="only the slice building rows (no API server)")
    args = parser.parse_args()

    config = DeviceConfig(node_name="bench-node")
    topology = read_topology(FIXTURE)
    build_rows: list[tuple[str, float, str, float]] = []
    modes = [(DeviceMode.GROUPED, g) for g in GroupBy] + [(DeviceMode.INDIVIDUAL, GroupBy.NUMA_NODE)]
    for mode, group_by in modes:
        for mapped in (False, True):
            mode_config = replace(config, device_mode=mode, group_by=group_by, node_allocatable=mapped)
            count = len(build_devices(topology, mode_config))
            build_ms = median_ms(partial(build, topology, mode_config), args.runs)
            what = f"{mode} by {group_by}" if mode is DeviceMode.GROUPED else str(mode)
            name = (
                f"build slices, big-8numa (64 CPUs), {what}{', mapped' if mapped else ''} ({count} devices), "
                f"median of {args.runs}"
            )
            build_rows.append((name, build_ms, "ms", 20.0))
    if args.build_only:
        return report(build_rows)
    devices = build_devices(topology, config)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory() as state, contextlib.ExitStack() as stack:
        try:
            plane = stack.enter_context(ControlPlane(Path(state), APISERVER_ONLY))
        except (ControlPlaneError, Unavailable) as err:
            print(f"cannot start the test API server: {err}", file=sys.stderr)
            return 2
        api = connect(str(plane.kubeconfig))
        publisher = SlicePublisher(api, config, logging.getLogger("bench.publisher"))
        publisher.set_devices(devices)
        stop = threading.Event()
        runner = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
        runner.start()
        while not versions(api, config):
            time.sleep(0.01)
        time.sleep(1)  # let the start-up reconciles (first list of the watch) pass
        changed, writes = idle_writes(api, publisher, config, args.idle_seconds)
        latencies = [republish_ms(api, config) for _ in range(args.runs)]
        stop.set()
        runner.join()

    rows = [
        *build_rows,
        (f"API writes while idle for {args.idle_seconds:g} s (publisher's count)", float(writes), "", 0.0),
        (f"slices changed on the server while idle for {args.idle_seconds:g} s", float(changed), "", 0.0),
        (
            f"republish after deletion by another client, median of {args.runs}",
            statistics.median(latencies),
            "ms",
            1000,
        ),
    ]
    status = report(rows)
    print(f"publisher republish latency min/max of {args.runs}: {min(latencies):.1f} / {max(latencies):.1f} ms")
    return status


def report(rows: list[tuple[str, float, str, float]]) -> int:
    ok = True
    for name, value, unit, goal in rows:
        verdict = "ok" if value <= goal else "OVER GOAL"
        ok = ok and value <= goal
        print(f"publisher {name:<92} {value:8.1f} {unit:<2}  goal <= {goal:g} {unit:<2}  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
