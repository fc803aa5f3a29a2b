"""The README's first command: the demo walks a claim through the real daemon and confines a real process."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_confines_a_process_to_the_claimed_cpus() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dra_cpu", "demo", "--cpus", "1"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    chosen = re.search(r"chosen CPUs: (\S+)", run.stdout)
    allowed = re.search(r"reads Cpus_allowed_list: (\S+) from /proc", run.stdout)
    assert chosen and allowed and chosen.group(1) == allowed.group(1)
    assert "CDI spec removed: True" in run.stdout
    assert "Demo succeeded" in run.stdout
    assert run.stderr == ""


def test_demo_refuses_to_take_every_cpu() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dra_cpu", "demo", "--cpus", "64"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2
    assert "--cpus 64: NUMA node 0 publishes" in run.stderr and "Traceback" not in run.stderr
