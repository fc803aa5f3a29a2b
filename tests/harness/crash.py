"""kill -9 at random points of a prepare/unprepare stream, restart, check: shared by tests/store/test_crash_safety.py
(which asserts the figures) and hack/bench/crash.py (which prints them).

A stream is a machine (one sysfs tree, or two that the restarts alternate between: a node that shrinks and grows
back across reboots) and a set of allocated claims. Each round starts tests/harness/crash_worker.py on the round's
machine, checks what it recovered against everything acknowledged so far, lets it prepare and unprepare at random,
and kills it with SIGKILL at a random instant. Counted, never assumed:

- double bookings: a CPU in two recovered claims, or hugepages of one pool beyond what the machine reserves;
- lost: an acknowledged claim that is neither recovered unchanged nor reported as unrestorable for a reason the
  machine of that start justifies (its CPUs are not online, its hugepage pool is gone);
- mismatches: CDI specs and checkpoint entries that disagree.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.core.cdi_spec import env_of_spec
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import PreparedClaim
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile, claim_from_record
from tests.harness.claims import DRIVER, result
from tests.harness.paths import REPO, SYSFS
from tests.harness.synthetic_sysfs import SyntheticNode, uniform_machine, write_tree

# What an acknowledged prepare granted: the CPUs and the (node, page KiB, bytes) hugepage grants.
Grant = tuple[CPUSet, tuple[tuple[int, int, int], ...]]


@dataclass(frozen=True)
class Stream:
    name: str
    # Restart k runs on machines[(k // switch_every) % len(machines)].
    machines: tuple[Path, ...]
    claims: tuple[list[dict[str, Any]], ...]
    switch_every: int = 1

    def machine(self, restart: int) -> Path:
        return self.machines[(restart // self.switch_every) % len(self.machines)]


@dataclass
class Figures:
    """What one stream counted: its restarts, the failures of each kind, and the first few failures' messages."""

    stream: str
    restarts: int = 0
    double_bookings: int = 0
    lost: int = 0
    mismatches: int = 0
    acknowledged: int = 0
    reported: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, message: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failures) < 20:
            self.failures.append(f"restart {self.restarts}: {message}")


def _smt_machine(root: Path, threads: int, pages: int) -> Path:
    """2 NUMA nodes of 4 cores; with threads=1 the second threads (CPUs 8-15) are gone, as with SMT off."""
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=4, threads=threads)
    nodes = [SyntheticNode(n.id, n.cpus, hugepages={2048: (pages, pages)}) for n in nodes]
    return write_tree(root, cpus, nodes)


def streams(root: Path) -> dict[str, Stream]:
    """The three streams: plain CPU claims, CPU + hugepage claims that oversubscribe the pools, and a node that
    loses half its CPUs (and a hugepage pool) every few restarts and gets them back."""
    smt_on = _smt_machine(root / "machines/smt-on", threads=2, pages=16)
    smt_off = _smt_machine(root / "machines/smt-off", threads=1, pages=0)
    plain = tuple([result(f"cpu-numa{i % 8}", cpus=1 + i % 3)] for i in range(24))
    huge = tuple(
        [
            result(f"cpu-numa{i % 2}", cpus=1),
            result(f"hugepages-2mi-numa{i % 2}", request="mem", memory=f"{2 * (1 + i % 4)}Mi"),
        ]
        for i in range(16)
    )
    shrink = tuple(
        [result(f"cpu-numa{i % 2}", cpus=1 + i % 2)]
        + ([result(f"hugepages-2mi-numa{i % 2}", request="mem", memory="4Mi")] if i % 3 == 0 else [])
        for i in range(12)
    )
    return {
        "plain": Stream("plain", (SYSFS / "big-8numa",), plain),
        "hugepages": Stream("hugepages", (smt_on,), huge),
        "shrunken": Stream("shrunken", (smt_on, smt_off), shrink, switch_every=4),
    }


def _write_claims(root: Path, claims: tuple[list[dict[str, Any]], ...]) -> None:
    for i, results in enumerate(claims):
        obj = {
            "metadata": {"name": f"c{i}", "namespace": "default", "uid": f"uid-{i}"},
            "status": {"allocation": {"devices": {"results": results}}},
        }
        path = root / "cluster/resourceclaims/default" / f"c{i}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj))


def grant_of(claim: PreparedClaim) -> Grant:
    return claim.cpus, tuple(sorted((h.numa_node, h.page_size_kib, h.bytes) for h in claim.hugepages))


def _justified(grant: Grant, topology: Topology) -> bool:
    """Whether this machine cannot hold the grant: a CPU not online, or a hugepage pool it does not reserve."""
    cpus, pages = grant
    pools = {(n.id, p.size_kib) for n in topology.numa_nodes for p in n.hugepages if p.total}
    return bool(cpus - topology.online_cpus) or any((node, size) not in pools for node, size, _ in pages)


def _check(
    root: Path,
    topology: Topology,
    figures: Figures,
    acked: dict[str, Grant],
    leaving: dict[str, Grant],
) -> None:
    checkpoint = CheckpointFile(root / "state").load()
    assert checkpoint is not None, "the worker saved a checkpoint before saying ready"
    claims, lost = checkpoint.ledger.claims, checkpoint.ledger.unrestorable
    seen: set[int] = set()
    for claim in claims.values():
        if not seen.isdisjoint(claim.cpus.ids):
            figures.fail("double_bookings", f"CPU in two claims: {claim.uid} {claim.cpus}")
        seen |= claim.cpus.ids
    capacity = {(n.id, p.size_kib): p.total * p.size_bytes for n in topology.numa_nodes for p in n.hugepages}
    held: dict[tuple[int, int], int] = {}
    for claim in claims.values():
        for h in claim.hugepages:
            held[(h.numa_node, h.page_size_kib)] = held.get((h.numa_node, h.page_size_kib), 0) + h.bytes
    for key, size in held.items():
        if size > capacity.get(key, 0):
            figures.fail("double_bookings", f"hugepages {key}: {size} bytes held, {capacity.get(key, 0)} reserved")
    for uid, grant in list(acked.items()):
        if uid in claims and grant_of(claims[uid]) == grant:
            continue
        if uid in lost and _justified(grant, topology):
            # Reported, not lost: the kubelet's prepares of it now get the reason.
            del acked[uid]
            figures.reported += 1
            continue
        figures.fail("lost", f"acknowledged claim {uid} {grant[0]} lost or changed")
        acked.pop(uid)
    for uid, grant in leaving.items():
        if uid in claims and grant_of(claims[uid]) != grant:
            figures.fail("lost", f"claim {uid} changed while it was being unprepared")
    store = CDIStore(root / "cdi", DRIVER)
    if set(store.uids()) != set(claims):
        figures.fail("mismatches", f"CDI specs {sorted(store.uids())} != checkpoint {sorted(claims)}")
    for uid, claim in claims.items():
        env = env_of_spec(store.read(uid)) if store.path(uid).exists() else {}
        if CPUSet.parse(env.get(f"DRA_CPUSET_{uid}", "")) != claim.cpus:
            figures.fail("mismatches", f"spec of {uid} does not carry CPUs {claim.cpus}")


def run_stream(root: Path, stream: Stream, kills: int, seed: int = 1234, max_delay: float = 0.03) -> Figures:
    """`kills` rounds of start, check, stream, SIGKILL; then a last clean start that re-prepares every
    acknowledged claim and must get the same grant back."""
    (root / "state").mkdir(parents=True, exist_ok=True)
    _write_claims(root, stream.claims)
    rng = random.Random(seed)
    figures = Figures(stream.name)
    acked: dict[str, Grant] = {}
    leaving: dict[str, Grant] = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill in range(kills):
        machine = stream.machine(kill)
        worker = ["-m", "tests.harness.crash_worker", str(root), str(len(stream.claims)), str(kill), str(machine)]
        with (root / "worker.log").open("a") as log:
            proc = subprocess.Popen(
                [sys.executable, *worker],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
                env=env,
            )
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline().strip()
        if ready != "ready":
            proc.kill()
            proc.wait()
            tail = (root / "worker.log").read_text().splitlines()[-3:]
            figures.failures.append(f"restart {kill}: the worker did not start ({ready!r}): {' | '.join(tail)}")
            return figures
        figures.restarts += 1
        _check(root, read_topology(machine), figures, acked, leaving)
        recovered = CheckpointFile(root / "state").load()
        assert recovered is not None
        acked.update({u: g for u, g in leaving.items() if u in recovered.ledger.claims})
        leaving.clear()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(rng.uniform(0, max_delay))
        os.kill(proc.pid, signal.SIGKILL)
        for line in proc.stdout.read().splitlines():
            op, uid, rest = [*line.split(" ", 2), ""][:3]
            if op == "prepared":
                acked[uid] = grant_of(claim_from_record(json.loads(rest)))
                figures.acknowledged += 1
            elif op == "unpreparing" and uid in acked:
                leaving[uid] = acked.pop(uid)
            elif op == "unprepared" and not rest:
                leaving.pop(uid, None)
        proc.wait()
    last = stream.machine(kills)
    out = subprocess.run(
        [sys.executable, "-c", _REPREPARE, str(root), str(last)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    reprepared = json.loads(out.stdout)
    topology = read_topology(last)
    for uid, grant in acked.items():
        again = reprepared.get(uid)
        if again is None and _justified(grant, topology):
            figures.reported += 1
        elif again is None or grant_of(claim_from_record(again)) != grant:
            figures.fail("lost", f"re-prepare of acknowledged claim {uid} gave {again}, not {grant[0]}")
    return figures


_REPREPARE = """
import json, sys
from pathlib import Path
from dra_cpu.core.claims import ClaimRef
from dra_cpu.store.checkpoint import claim_record
from tests.harness.nodes.standin import make_driver
driver = make_driver(Path(sys.argv[1]), sys.argv[2])
driver.start()
refs = [ClaimRef("default", c.ref.name, uid) for uid, c in driver.snapshot().ledger.claims.items()]
out = {r.uid: claim_record(res.claim) for r, res in zip(refs, driver.prepare(refs).values()) if res.claim}
print(json.dumps(out))
"""
