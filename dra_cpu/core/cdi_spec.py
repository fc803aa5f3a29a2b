"""CDI specs that carry a claim's grant into its containers, as values (store/cdi_files.py writes them).

CDI cannot set a cpuset (protocols.md §3.5): the spec puts the decision in the container's environment, where the
NRI plugin (or the createRuntime hook) reads and enforces it. The same variables let the driver rebuild its state
from its specs when the checkpoint is lost. cdiVersion 0.5.0 is the newest that podman 4, containerd 1.7 and
containerd 2.x all accept.

Every variable is named twice. `DRA_CPUSET_<uid>` is the upstream driver's name, which workloads and tools read and
which enforcement trusts; but a claim UID has dashes, and a POSIX shell (dash, busybox sh) can neither expand such a
name nor pass it on to the commands it starts. `DRA_CPUSET_<uid with _ for ->` carries the same value under a name
every shell keeps (`shell_uid`). The twins are for reading only: enforcement ignores them, so writing one into a
pod spec entitles nothing.
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
# A claim UID as shell_uid() writes it: the twins' suffix.
_SHELL_UID = re.compile(r"[0-9a-fA-F]{8}_[0-9a-fA-F]{4}_[0-9a-fA-F]{4}_[0-9a-fA-F]{4}_[0-9a-fA-F]{12}")


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


def shell_uid(uid: str) -> str:
    """The claim UID as the twin variables carry it: a name POSIX shells keep."""
    return uid.replace("-", "_")


def env_for(claim: PreparedClaim, mems: CPUSet) -> list[str]:
    values = [
        (ENV_CPUSET, str(claim.cpus)),
        (ENV_MEMS, str(mems)),
        (ENV_CLAIM, f"{claim.ref.namespace}/{claim.ref.name}"),
        (ENV_PODS, ",".join(claim.pod_uids)),
    ]
    if claim.hugepages:
        values.append(
            (ENV_HUGEPAGES, ",".join(f"{h.page_size_kib}kB@{h.numa_node}={h.bytes}" for h in claim.hugepages))
        )
    if claim.memory:
        values.append((ENV_MEMORY, ",".join(f"{m.numa_node}={m.bytes}" for m in claim.memory)))
    values.append((ENV_MEMORY_BINDING, str(claim.binding)))
    names = [claim.uid] if shell_uid(claim.uid) == claim.uid else [claim.uid, shell_uid(claim.uid)]
    return [f"{prefix}{name}={value}" for name in names for prefix, value in values]


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
    """Claim uid -> the raw value of each DRA_CPUSET_<uid> in a container's env ("NAME=value" items); the shell
    twins (DRA_CPUSET_<uid with _>) are copies for reading and are left out."""
    claims = {}
    for item in env:
        key, sep, value = item.partition("=")
        uid = key[len(ENV_CPUSET) :]
        if sep and key.startswith(ENV_CPUSET) and uid and not _SHELL_UID.fullmatch(uid):
            claims[uid] = value
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
