"""A driver process for the crash test: recover, say ready, then prepare and unprepare claims at random, printing
each acknowledged result (what the kubelet would have been told) before moving on. The test kills it with -9."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from dra_cpu.core.claims import ClaimRef
from tests.support.kubelet_node import make_driver


def main(root: Path, claims: int, seed: int) -> None:
    driver = make_driver(root, "big-8numa")
    driver.start()
    print("ready", flush=True)
    # The test checks the recovered state before the stream changes it.
    sys.stdin.readline()
    rng = random.Random(seed)
    refs = [ClaimRef("default", f"c{i}", f"uid-{i}") for i in range(claims)]
    while True:
        ref = rng.choice(refs)
        if ref.uid in driver.state.claims:
            # From here the claim may be gone even if the kill comes before the acknowledgement.
            print(f"unpreparing {ref.uid}", flush=True)
            error = driver.unprepare([ref])[ref.uid]
            print(f"unprepared {ref.uid} {error}", flush=True)
        else:
            result = driver.prepare([ref])[ref.uid]
            cpus = result.claim.cpus if result.claim else "-"
            print(f"prepared {ref.uid} {cpus} {result.error}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
