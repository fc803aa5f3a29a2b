"""CDI specs that carry a claim's grant into its containers, as values (store/cdi_files.py writes them).

CDI cannot set a cpuset (protocols.md §3.5): the spec puts the decision in the container's environment, where the
NRI plugin (or the createRuntime hook) reads and enforces it. The same variables let the driver rebuild its state
from its specs when the checkpoint is lost. cdiVersion 0.5.0 is the newest that podman 4, containerd 1.7 and
containerd 2.x all accept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import HugePageGrant, MemoryGrant, PreparedClaim, PreparedDevice
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.errors import DraCpuError

CDI_VERSION = "0.5.0"
CDI_CLASS = "cpu"
# The upstream driver's variable: workloads and tools that read it keep working.
ENV_CPUSET = "DRA_CPUSET_"
ENV_MEMS = "DRA_MEMS_"
ENV_HUGEPAGES = "DRA_HUGEPAGES_"
# The claim's memory per NUMA node (`<node>=<bytes>,...`), and how its containers' memory is bound (core/memory.py).
ENV_MEMORY = "DRA_MEMORY_"
ENV_MEMORY_BINDING = "DRA_MEMORY_BINDING_"
ENV_CLAIM = "DRA_CLAIM_"
ENV_PODS = "DRA_PODS_"
_HUGEPAGE_ITEM = re.compile(r"^(\d+)kB@(\d+)=(\d+)$")
_MEMORY_ITEM = re.compile(r"^(\d+)=(\d+)$")


class CDIError(DraCpuError):
    pass


def device_name(uid: str) -> str:
    return f"claim-{uid}"


def kind(driver: str) -> str:
    return f"{driver}/{CDI_CLASS}"


def device_id(driver: str, uid: str) -> str:
    """The fully qualified name the kubelet hands to the runtime: vendor/class=name."""
    return f"{kind(driver)}={device_name(uid)}"


def spec_filename(driver: str, uid: str) -> str:
    return f"{driver}-{CDI_CLASS}_{device_name(uid)}.json"


def env_for(claim: PreparedClaim, mems: CPUSet) -> list[str]:
    uid = claim.uid
    env = [
        f"{ENV_CPUSET}{uid}={claim.cpus}",
        f"{ENV_MEMS}{uid}={mems}",
        f"{ENV_CLAIM}{uid}={claim.ref.namespace}/{claim.ref.name}",
        f"{ENV_PODS}{uid}={','.join(claim.pod_uids)}",
    ]
    if claim.hugepages:
        items = ",".join(f"{h.page_size_kib}kB@{h.numa_node}={h.bytes}" for h in claim.hugepages)
        env.append(f"{ENV_HUGEPAGES}{uid}={items}")
    if claim.memory:
        env.append(f"{ENV_MEMORY}{uid}={','.join(f'{m.numa_node}={m.bytes}' for m in claim.memory)}")
    env.append(f"{ENV_MEMORY_BINDING}{uid}={claim.binding}")
    return env


def build_spec(
    driver: str, claim: PreparedClaim, mems: CPUSet, hooks: tuple[Mapping[str, Any], ...] = ()
) -> dict[str, Any]:
    edits: dict[str, Any] = {"env": env_for(claim, mems)}
    if hooks:
        edits["hooks"] = [dict(h) for h in hooks]
    return {
        "cdiVersion": CDI_VERSION,
        "kind": kind(driver),
        "devices": [{"name": device_name(claim.uid), "containerEdits": edits}],
    }


def claimed_cpusets(env: Iterable[str]) -> dict[str, str]:
    """Claim uid -> the raw value of each DRA_CPUSET_<uid> in a container's env ("NAME=value" items)."""
    claims = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep and key.startswith(ENV_CPUSET) and len(key) > len(ENV_CPUSET):
            claims[key[len(ENV_CPUSET) :]] = value
    return claims


def claim_from_env(env: Mapping[str, str], uid: str, pool: str) -> PreparedClaim:
    """Rebuild a claim's grant from the variables of its spec (when the checkpoint is lost)."""
    try:
        namespace, _, name = env[f"{ENV_CLAIM}{uid}"].partition("/")
    except KeyError as err:
        raise CDIError(f"CDI spec of claim {uid}: cannot read {err}") from None
    return grant_from_env(env, uid, pool, ClaimRef(namespace, name, uid))


def grant_from_env(env: Mapping[str, str], uid: str, pool: str, ref: ClaimRef) -> PreparedClaim:
    """What the spec's variables say the claim `ref` holds: its CPUs, pages and memory (on devices without names),
    its pods and its memory binding."""
    try:
        cpus = CPUSet.parse(env[f"{ENV_CPUSET}{uid}"])
        devices = [PreparedDevice(request_names=(), pool=pool, device="", cpus=cpus)] if cpus else []
        for size, node, count in _items(env, f"{ENV_HUGEPAGES}{uid}", _HUGEPAGE_ITEM, "hugepages"):
            devices.append(
                PreparedDevice(request_names=(), pool=pool, device="", hugepages=HugePageGrant(node, size, count))
            )
        for node, count in _items(env, f"{ENV_MEMORY}{uid}", _MEMORY_ITEM, "memory"):
            devices.append(PreparedDevice(request_names=(), pool=pool, device="", memory=MemoryGrant(node, count)))
        pods = tuple(filter(None, env.get(f"{ENV_PODS}{uid}", "").split(",")))
        binding = env.get(f"{ENV_MEMORY_BINDING}{uid}")
        # Specs written before the variable existed bound every claim as the default for what it holds does now.
        memory_binding = MemoryBinding(binding) if binding is not None else None
    except (KeyError, ValueError, DraCpuError) as err:
        raise CDIError(f"CDI spec of claim {uid}: cannot read {err}") from None
    return PreparedClaim(ref, tuple(devices), pods).with_binding(memory_binding)


def _items(env: Mapping[str, str], key: str, pattern: re.Pattern[str], what: str) -> list[tuple[int, ...]]:
    items = []
    for item in filter(None, env.get(key, "").split(",")):
        match = pattern.match(item)
        if not match:
            raise ValueError(f"{what} item {item!r}")
        items.append(tuple(map(int, match.groups())))
    return items


def env_of_spec(spec: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for device in spec.get("devices", []):
        for item in device.get("containerEdits", {}).get("env", []):
            key, _, value = str(item).partition("=")
            env[key] = value
    return env
