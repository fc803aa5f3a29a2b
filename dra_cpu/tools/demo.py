"""`dra-cpu demo`: the whole walk of a claim on this machine, with no cluster.

It runs the real daemon in standalone mode (the API server replaced by a folder), writes a claim as the scheduler
would have allocated it, calls NodePrepareResources through the real socket as the kubelet would, starts a real
process confined to the chosen CPUs, reads its Cpus_allowed_list back from /proc, then unprepares and cleans up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dra_cpu import logs
from dra_cpu.config import Config
from dra_cpu.core.claims import ClaimRef, allocated_claim_object, allocation_result
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.daemon import Daemon
from dra_cpu.errors import DraCpuError
from dra_cpu.kubelet.client import KubeletClient
from dra_cpu.kubelet.registration import PluginPaths
from dra_cpu.node.cgroups import CGROUP_ROOT, Cpusets, find_cpuset_hierarchy

NAMESPACE = "default"


def claim_object(name: str, uid: str, node: str, driver: str, device: str, cpus: int, pod_uid: str) -> dict[str, Any]:
    """The demo's claim: `cpus` CPUs of `device`, allocated on `node` and reserved for one pod."""
    key = f"{driver}/cpu"
    request = {"name": "cpus", "exactly": {"deviceClassName": driver, "capacity": {"requests": {key: str(cpus)}}}}
    result = allocation_result(driver, node, device, consumed={key: str(cpus)}, share_id=str(uuid.uuid4()))
    return allocated_claim_object(NAMESPACE, name, [result], uid=uid, pod_uids=[pod_uid], requests=[request], node=node)


def _wait(what: str, check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DraCpuError(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def run_demo(cpus: int, out: Callable[[str], None] = print) -> int:
    logs.setup("error")
    with tempfile.TemporaryDirectory(prefix="dra-cpu-demo-") as tmp:
        root = Path(tmp)
        config = Config(
            node_name="demo-node",
            standalone=str(root / "cluster"),
            kubelet_root_dir=str(root / "kubelet"),
            cdi_root=str(root / "cdi"),
            state_dir=str(root / "state"),
            enforcement="none",
            metrics_address="127.0.0.1:0",
            log_level="warning",
        ).validate()
        daemon = Daemon(config)
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                daemon.run()
            except BaseException as err:  # reported below: the demo must not hang on a daemon that died
                errors.append(err)
                daemon.stop.set()

        thread = threading.Thread(target=serve, name="daemon", daemon=True)
        thread.start()
        paths = PluginPaths(Path(config.kubelet_root_dir), config.driver_name)
        slices_dir = Path(config.standalone) / "resourceslices"
        try:
            _wait("the daemon to publish its ResourceSlices", lambda: bool(errors) or any(slices_dir.glob("*.yaml")))
            _wait("the registration socket", lambda: bool(errors) or paths.registration_socket.exists())
            if errors:
                err = errors[0]
                raise err if isinstance(err, DraCpuError) else DraCpuError(f"demo: the daemon failed: {err!r}")
            return _walk(config, paths, slices_dir, cpus, out)
        finally:
            daemon.stop.set()
            thread.join(timeout=10)


def _walk(config: Config, paths: PluginPaths, slices_dir: Path, cpus: int, out: Callable[[str], None]) -> int:
    slices = [yaml.safe_load(p.read_text()) for p in sorted(slices_dir.glob("*.yaml"))]
    devices = [d for s in slices for d in s["spec"]["devices"]]
    out(f"1. Published {len(slices)} ResourceSlice(s) for node {config.node_name}:")
    for device in devices:
        capacities: list[dict[str, Any]] = list(device.get("capacity", {}).values())
        capacity = capacities[0]["value"] if capacities else "-"
        out(f"     {device['name']:<24} capacity {capacity}")
    cpu_device = next((d for d in devices if d["name"] == "cpu-numa0"), None)
    if cpu_device is None:
        raise DraCpuError("demo: this machine publishes no cpu-numa0 device")
    available = int(cpu_device["capacity"][f"{config.driver_name}/cpu"]["value"])
    # The device already leaves out the CPUs kept for the shared pool (minSharedCpus).
    if cpus > available:
        raise DraCpuError(f"--cpus {cpus}: NUMA node 0 publishes {available} CPUs (the rest stay shared)")

    uid, pod_uid, name = str(uuid.uuid4()), str(uuid.uuid4()), "demo-claim"
    claim = claim_object(name, uid, config.node_name, config.driver_name, "cpu-numa0", cpus, pod_uid)
    claim_file = Path(config.standalone) / "resourceclaims" / NAMESPACE / f"{name}.yaml"
    claim_file.parent.mkdir(parents=True, exist_ok=True)
    claim_file.write_text(yaml.safe_dump(claim, sort_keys=False))
    out(f"2. The scheduler allocated claim {NAMESPACE}/{name} ({uid}): {cpus} CPU(s) of device cpu-numa0")

    kubelet = KubeletClient.register(paths.registration_socket)
    try:
        out(f"3. The kubelet registered the plugin ({kubelet.service}) and calls NodePrepareResources")
        ref = ClaimRef(NAMESPACE, name, uid)
        result = kubelet.prepare([ref]).claims[uid]
        if result.error:
            raise DraCpuError(f"demo: prepare failed: {result.error}")
        cdi_id = result.devices[0].cdi_device_ids[0]
        spec_path = next(Path(config.cdi_root).glob(f"*{uid}.json"))
        spec = json.loads(spec_path.read_text())
        env = dict(e.split("=", 1) for e in spec["devices"][0]["containerEdits"]["env"])
        chosen = CPUSet.parse(env[f"DRA_CPUSET_{uid}"])
        out(f"   chosen CPUs: {chosen}   memory nodes: {env[f'DRA_MEMS_{uid}']}   CDI device: {cdi_id}")
        out(f"   CDI spec {spec_path.name}:")
        out("     " + json.dumps(spec, indent=1).replace("\n", "\n     "))

        allowed, how = _confined_process(chosen)
        out(f"4. A process confined by {how} reads Cpus_allowed_list: {allowed} from /proc/<pid>/status")
        ok = CPUSet.parse(allowed) == chosen

        error = kubelet.unprepare([ref]).claims[uid].error
        if error:
            raise DraCpuError(f"demo: unprepare failed: {error}")
        out(f"5. NodeUnprepareResources: CPUs {chosen} returned, CDI spec removed: {not spec_path.exists()}")
    finally:
        kubelet.close()
    out("Demo " + ("succeeded: the process ran exactly on the claim's CPUs." if ok else "FAILED: the cpuset differs."))
    return 0 if ok else 1


def _confined_process(cpus: CPUSet) -> tuple[str, str]:
    """Start a process inside a cgroup cpuset where one is writable (what the runtime does), else with affinity."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    hierarchy = find_cpuset_hierarchy(CGROUP_ROOT, Path("/proc/self/cgroup").read_text()) if os.geteuid() == 0 else None
    cpusets = Cpusets(hierarchy, f"dra-cpu-demo-{os.getpid()}") if hierarchy else None
    try:
        if cpusets is not None:
            cpusets.place("claim", cpus, [proc.pid])
            how = f"a {cpusets.hierarchy.name} cpuset"
        else:
            os.sched_setaffinity(proc.pid, cpus.sorted())
            how = "sched_setaffinity (no writable cpuset cgroup)"
        return _status_field(proc.pid, "Cpus_allowed_list"), how
    finally:
        proc.kill()
        proc.wait()
        if cpusets is not None:
            cpusets.close()


def _status_field(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise DraCpuError(f"{key} missing from /proc/{pid}/status")
