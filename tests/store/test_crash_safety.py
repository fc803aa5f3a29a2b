"""kill -9 at random points during a stream of prepares and unprepares, 200 times: after every restart no CPU is
in two claims, every acknowledged claim has the same CPUs, and CDI specs and checkpoint entries agree."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dra_cpu.core.cdi_spec import env_of_spec
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile
from tests.support.kubelet_node import DRIVER, result
from tests.support.paths import REPO

KILLS = 200
CLAIMS = 24


def _write_claims(root: Path) -> None:
    for i in range(CLAIMS):
        obj = {
            "metadata": {"name": f"c{i}", "namespace": "default", "uid": f"uid-{i}"},
            "status": {"allocation": {"devices": {"results": [result(f"cpu-numa{i % 8}", cpus=1 + i % 3)]}}},
        }
        path = root / "cluster/resourceclaims/default" / f"c{i}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj))


def _check_consistent(root: Path, acked: dict[str, CPUSet], leaving: dict[str, CPUSet]) -> None:
    """`acked` claims must be there unchanged; `leaving` ones (unprepare sent, no answer) there unchanged or gone."""
    checkpoint = CheckpointFile(root / "state").load()
    assert checkpoint is not None
    claims = checkpoint.state.claims
    seen: set[int] = set()
    for claim in claims.values():
        assert seen.isdisjoint(claim.cpus.ids), f"CPU in two claims: {claim.cpus}"
        seen |= claim.cpus.ids
    for uid, cpus in acked.items():
        assert uid in claims and claims[uid].cpus == cpus, f"acknowledged claim {uid} lost or changed"
    for uid, cpus in leaving.items():
        assert uid not in claims or claims[uid].cpus == cpus, f"claim {uid} changed while it was being unprepared"
    store = CDIStore(root / "cdi", DRIVER)
    assert set(store.uids()) == set(claims), "CDI specs and checkpoint entries differ"
    for uid, claim in claims.items():
        assert CPUSet.parse(env_of_spec(store.read(uid))[f"DRA_CPUSET_{uid}"]) == claim.cpus


def test_kill_9_at_random_points(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    _write_claims(tmp_path)
    rng = random.Random(1234)
    acked: dict[str, CPUSet] = {}
    leaving: dict[str, CPUSet] = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.crash_worker", str(tmp_path), str(CLAIMS), str(kill)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        # The previous run's state, as recovered and reconciled by this start, must be consistent.
        _check_consistent(tmp_path, acked, leaving)
        recovered = CheckpointFile(tmp_path / "state").load()
        assert recovered is not None
        acked.update({uid: cpus for uid, cpus in leaving.items() if uid in recovered.state.claims})
        leaving.clear()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(rng.uniform(0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        for line in proc.stdout.read().splitlines():
            op, uid, *rest = [*line.split(" ", 2), ""]
            if op == "prepared" and rest[0] != "-":
                acked[uid] = CPUSet.parse(rest[0].split(" ")[0])
            elif op == "unpreparing" and uid in acked:
                leaving[uid] = acked.pop(uid)
            elif op == "unprepared" and not rest[0]:
                leaving.pop(uid, None)
        proc.wait()
    assert len(acked) > 0, "the stream prepared something"
    # A last clean start: repeated prepares of every acknowledged claim give the same CPUs back.
    rerun = subprocess.run(
        [sys.executable, "-c", _REPREPARE, str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env, check=True
    )
    reprepared = json.loads(rerun.stdout)
    assert {uid: reprepared.get(uid) for uid in acked} == {uid: str(cpus) for uid, cpus in acked.items()}


_REPREPARE = """
import json, sys
from pathlib import Path
from dra_cpu.core.claims import ClaimRef
from tests.support.kubelet_node import make_driver
driver = make_driver(Path(sys.argv[1]), "big-8numa")
driver.start()
refs = [ClaimRef("default", c.ref.name, uid) for uid, c in driver.state.claims.items()]
out = {r.uid: str(res.claim.cpus) for r, res in zip(refs, driver.prepare(refs).values()) if res.claim}
print(json.dumps(out))
"""
