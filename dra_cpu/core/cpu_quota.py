"""Will the CFS quota the kubelet gives a container let it use the CPUs its claim pins it to? Pure.

The kubelet turns limits.cpu into a CFS quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), as core/pod_limits.py
reads it. A container pinned to N exclusive CPUs with a quota of fewer is throttled on CPUs no one else may use: the
claim wastes them and the workload runs slower than it would without one. So prepare refuses such a pod instead of
pinning it.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from dra_cpu.core.pod_limits import claim_containers, number

CPU = "cpu"


def _cpus(value: Fraction) -> str:
    return f"{number(value)} CPU{'' if value == 1 else 's'}"


def throttled(pod: Mapping[str, Any], claim: str, cpus: int) -> list[str]:
    """One message per container of `pod` that uses the ResourceClaim named `claim` (pinned to its `cpus` CPUs)
    and whose quota is smaller; empty when none is."""
    problems = []
    for container in claim_containers(pod, claim):
        quota = container.limit(CPU)
        if quota is None or quota.amount >= cpus:
            continue
        problems.append(
            f"{container.source}: container {container.name!r} would be CFS-throttled to {_cpus(quota.amount)} "
            f"({quota.describe(number)}) on the {_cpus(Fraction(cpus))} claim {claim!r} pins it to; raise that limit "
            f"to at least {number(cpus - quota.mapped)}, or remove it"
        )
    return problems
