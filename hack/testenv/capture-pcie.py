#!/usr/bin/env python3
"""Captures tests/fixtures/sysfs/pcie-expander-3numa from a real kernel: the test guest (tests/harness/guest/vm.py,
Debian's kernel under qemu TCG) booted on a q35 machine with one PCIe expander bus (pxb-pcie) bound to each NUMA node
and a PCIe device behind each, so that /sys/devices holds four PCIe root complexes: pci0000:00 (qemu's main host bridge,
which has no NUMA node), pci0000:10 (node 0), pci0000:20 (node 1) and pci0000:30 (node 2, memory-only).

Copies the files topology discovery reads (as the other captures: plain-file contents only; a cpuN/nodeX symlink
becomes an empty file) and, for PCI, each root bus's pci_bus/<bus>/cpulistaffinity and every device's numa_node.
Writes topology.txt (how it was made) and expected.json (facts computed here from the raw files, not by dra_cpu).
Run with .venv/bin/python once hack/testenv/guest.sh install is done (about a minute).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness.guest.vm import GuestSpec, boot, built  # noqa: E402

NAME = "pcie-expander-3numa"
# (expander bus number, NUMA node): bus_nr 0x10 names the root pci0000:10.
EXPANDERS = ((0x10, 0), (0x20, 1), (0x30, 2))


@dataclass(frozen=True)
class PcieSpec(GuestSpec):
    """The test guest's topology (2 sockets x 2 cores x 2 threads, nodes 0 and 1, memory-only node 2) on q35, without
    its isolcpus= (the tests that run on every capture expect no isolated CPUs)."""

    def kernel_args(self) -> list[str]:
        return [arg for arg in super().kernel_args() if not arg.startswith("isolcpus=")]

    def qemu_args(self) -> list[str]:
        return [*super().qemu_args(), "-machine", "q35"]

    def device_args(self) -> list[str]:
        args: list[str] = []
        for i, (bus, node) in enumerate(EXPANDERS):
            args += [
                "-device", f"pxb-pcie,id=pxb{i},bus_nr={bus},numa_node={node},bus=pcie.0",
                "-device", f"pcie-root-port,id=rp{i},bus=pxb{i},chassis={i + 1},slot=0",
                "-device", f"virtio-rng-pci,id=rng{i},bus=rp{i}",
            ]  # fmt: skip
        return args


# Runs in the guest with its python3: prints {path: content} of every file the fixture keeps.
COLLECT = r"""
import glob, json, os, re
out = {}
def keep(path):
    try:
        with open(path) as f:
            out[path.lstrip("/")] = f.read()
    except OSError:
        pass
for p in ["/proc/cpuinfo", "/proc/meminfo", "/proc/cmdline"]:
    keep(p)
base = "/sys/devices/system/cpu"
for name in ["isolated", "kernel_max", "nohz_full", "offline", "online", "possible", "present", "smt/active",
             "smt/control"]:
    keep(f"{base}/{name}")
for cpu in glob.glob(f"{base}/cpu[0-9]*"):
    keep(f"{cpu}/online")
    for f in glob.glob(f"{cpu}/topology/*"):
        keep(f)
    for index in glob.glob(f"{cpu}/cache/index[0-9]*"):
        for name in ["id", "level", "shared_cpu_list", "size", "type"]:
            keep(f"{index}/{name}")
    for link in glob.glob(f"{cpu}/node[0-9]*"):
        out[link.lstrip("/")] = ""
nbase = "/sys/devices/system/node"
for name in ["has_cpu", "has_memory", "has_normal_memory", "online", "possible"]:
    keep(f"{nbase}/{name}")
for node in glob.glob(f"{nbase}/node[0-9]*"):
    for name in ["cpulist", "cpumap", "distance", "meminfo"]:
        keep(f"{node}/{name}")
    for pool in glob.glob(f"{node}/hugepages/hugepages-*"):
        for name in ["free_hugepages", "nr_hugepages", "surplus_hugepages"]:
            keep(f"{pool}/{name}")
for pool in glob.glob("/sys/kernel/mm/hugepages/hugepages-*"):
    for name in ["free_hugepages", "nr_hugepages", "nr_overcommit_hugepages", "resv_hugepages", "surplus_hugepages"]:
        keep(f"{pool}/{name}")
bdf = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
for root in glob.glob("/sys/devices/pci*"):
    name = os.path.basename(root)
    keep(f"{root}/pci_bus/{name[3:]}/cpulistaffinity")
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if bdf.match(d)]
        if bdf.match(os.path.basename(dirpath)):
            keep(f"{dirpath}/numa_node")
print(json.dumps(out))
"""


def cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus += range(int(first), int(last or first) + 1)
    return sorted(cpus)


def expected(files: dict[str, str]) -> dict[str, Any]:
    """What discovery must find, from the raw files (independently of dra_cpu), in the other captures' shape."""

    def read(path: str) -> str:
        return files[path].strip()

    base = "sys/devices/system/cpu"
    online = cpulist(read(f"{base}/online"))
    isolated = cpulist(read(f"{base}/isolated"))
    node_ids = cpulist(read("sys/devices/system/node/online"))
    cpus: list[dict[str, Any]] = []
    for cpu in cpulist(read(f"{base}/present")):
        topo = f"{base}/cpu{cpu}/topology"
        node = next(int(p.rsplit("node", 1)[1]) for p in files if p.startswith(f"{base}/cpu{cpu}/node"))
        l3 = next(
            int(read(f"{base}/cpu{cpu}/cache/index{i}/id"))
            for i in range(8)
            if files.get(f"{base}/cpu{cpu}/cache/index{i}/level", "").strip() == "3"
        )
        cpus.append(
            {
                "id": cpu,
                "online": cpu in online,
                "socket": int(read(f"{topo}/physical_package_id")),
                "die": int(read(f"{topo}/die_id")),
                "core": int(read(f"{topo}/core_id")),
                "numaNode": node,
                "l3Cache": l3,
                "threadSiblings": cpulist(read(f"{topo}/thread_siblings_list")),
                "isolated": cpu in isolated,
            }
        )
    nodes = []
    for node in node_ids:
        d = f"sys/devices/system/node/node{node}"
        row = [int(x) for x in read(f"{d}/distance").split()]
        mem = next(int(line.split()[3]) for line in files[f"{d}/meminfo"].splitlines() if "MemTotal:" in line)
        nodes.append(
            {
                "id": node,
                "cpus": cpulist(read(f"{d}/cpulist")),
                "distances": {str(n): v for n, v in zip(node_ids, row, strict=True)},
                "memoryBytes": mem * 1024,
            }
        )
    roots = []
    for path in sorted(p for p in files if p.count("/") == 5 and p.endswith("/cpulistaffinity")):
        name = path.split("/")[2]
        on_bus = sorted(
            p for p in files if p.startswith(f"sys/devices/{name}/") and p.count("/") == 4 and p.endswith("/numa_node")
        )
        node_values = {int(read(p)) for p in on_bus}
        assert len(node_values) == 1, (name, node_values)
        node = node_values.pop()
        roots.append(
            {
                "name": name,
                "numaNode": None if node < 0 else node,
                "cpulistaffinity": cpulist(read(path)),
                "devicesOnRootBus": [p.split("/")[3] for p in on_bus],
            }
        )
    cores = {(c["socket"], c["die"], c["core"]) for c in cpus if c["online"]}
    shared = sorted(
        {read(p) for p in files if p.endswith("/shared_cpu_list") and files[p.rsplit("/", 1)[0] + "/level"] == "3\n"}
    )
    return {
        "cpus": cpus,
        "numaNodes": nodes,
        "pcieRoots": [{"name": r["name"], "numaNode": r["numaNode"]} for r in roots],
        "summary": {
            "cpus_online": len(online),
            "sockets": sorted({c["socket"] for c in cpus}),
            "physical_cores_online": len(cores),
            "threads_per_core": sorted({len(c["threadSiblings"]) for c in cpus}),
            "numa_nodes": node_ids,
            "l3_groups_by_shared_cpu_list": shared,
        },
        "raw": {"pcie_roots": roots},
    }


def main() -> int:
    build, why = built()
    if build is None:
        print(why, file=sys.stderr)
        return 1
    spec = PcieSpec()
    guest = boot(build, spec)
    try:
        files: dict[str, str] = json.loads(guest.python("-c", COLLECT).stdout)
        kernel = guest.run(["uname", "-r"]).stdout.strip()
        qemu_cmd = (guest.workdir / "qemu.cmd").read_text().strip()
    finally:
        guest.poweroff()
        shutil.rmtree(guest.workdir, ignore_errors=True)
    out = ROOT / "tests" / "fixtures" / "sysfs" / NAME
    shutil.rmtree(out, ignore_errors=True)
    for rel, content in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (out / "expected.json").write_text(json.dumps(expected(files), indent=1) + "\n")
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    (out / "topology.txt").write_text(
        f"Captured by hack/testenv/capture-pcie.py on {time.strftime('%Y-%m-%d', time.gmtime())}: the test guest\n"
        f"(tests/harness/guest/vm.py, Debian's kernel {kernel}, its Debian rootfs) under {qemu}\n"
        "with TCG (no KVM), on a q35 machine with three PCIe expander buses, one per NUMA node:\n"
        + "".join(
            f"  -device pxb-pcie,bus_nr={bus},numa_node={node},bus=pcie.0 (root pci0000:{bus:02x}) + pcie-root-port\n"
            f"    + virtio-rng-pci behind it\n"
            for bus, node in EXPANDERS
        )
        + "qemu's own host bridge pci0000:00 (the guest's disk, 9p share, serial port, q35 chipset) has no NUMA\n"
        "node: its devices' numa_node is -1 and its cpulistaffinity lists every online CPU. Node 2 has no CPUs:\n"
        "pci0000:30's cpulistaffinity is empty.\n\n"
        f"Guest topology: -smp {spec.cpus},sockets={spec.sockets},cores={spec.cores},threads={spec.threads}; "
        + ", ".join(f"node {n.id} CPUs {list(n.cpus) or 'none'} {n.memory_mib} MiB" for n in spec.nodes)
        + f"; distances {dict(sorted(spec.distances.items()))}.\n"
        f"kernel cmdline: {files['proc/cmdline'].strip()}\n\n"
        "Kept: the files topology discovery reads (as the other captures: plain-file contents only; an empty file\n"
        "sys/devices/system/cpu/cpuN/nodeX stands for the symlink the kernel created), and under each\n"
        "sys/devices/pciDDDD:BB/ root complex: pci_bus/DDDD:BB/cpulistaffinity and every PCI device's numa_node\n"
        "(the root bus's devices and the devices behind the root ports). Everything else under the roots (config\n"
        "space, resources, drivers, links, non-PCI children such as QEMU0002:00) was left out.\n\n"
        f"Full qemu command (paths shortened):\n  {_shorten(qemu_cmd)}\n"
    )
    print(f"wrote {out} ({len(files)} files)")
    return 0


def _shorten(cmd: str) -> str:
    words = []
    for word in shlex.split(cmd):
        for prefix in (str(ROOT), "/var/cache/dra-cpu-testenv/guest/", "/tmp/"):
            if prefix in word:
                head, _, tail = word.partition(prefix)
                word = head + ".../" + tail.rsplit("/", 1)[-1]
        words.append(word)
    return shlex.join(words)


if __name__ == "__main__":
    sys.exit(main())
