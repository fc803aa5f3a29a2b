"""A driver process for the crash test: recover, say ready, then prepare and unprepare claims at random, printing
each acknowledged result (what the kubelet would have been told) before moving on. The test kills it with -9.

    python -m tests.harness.crash_worker ROOT CLAIMS SEED [SYSFS_ROOT]

Output lines: `prepared <uid> <claim as JSON>`, `failed <uid> <error>`, `unpreparing <uid>`, `unprepared <uid>
[<error>]`. A claim the driver reports as unrestorable is unprepared, as the kubelet does once its pod is deleted.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from dra_cpu.core.claims import ClaimRef
from dra_cpu.store.checkpoint import claim_record
from tests.harness.nodes.standin import make_driver


def main(root: Path, claims: int, seed: int, machine: str) -> None:
    driver = make_driver(root, machine)
    driver.start()
    print("ready", flush=True)
    # The test checks the recovered state before the stream changes it.
    sys.stdin.readline()
    rng = random.Random(seed)
    refs = [ClaimRef("default", f"c{i}", f"uid-{i}") for i in range(claims)]
    while True:
        ref = rng.choice(refs)
        ledger = driver.snapshot().ledger
        if ref.uid in ledger.claims or ref.uid in ledger.unrestorable:
            # From here the claim may be gone even if the kill comes before the acknowledgement.
            print(f"unpreparing {ref.uid}", flush=True)
            error = driver.unprepare([ref])[ref.uid]
            print(f"unprepared {ref.uid} {error}".rstrip(), flush=True)
        else:
            result = driver.prepare([ref])[ref.uid]
            if result.claim is not None:
                print(f"prepared {ref.uid} {json.dumps(claim_record(result.claim))}", flush=True)
            else:
                print(f"failed {ref.uid} {result.error}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "big-8numa")
