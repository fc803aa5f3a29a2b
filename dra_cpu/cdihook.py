"""The createRuntime hook of `--enforcement cdi-hook` (`dra-cpu cdi-hook`), for runtimes without NRI.

The claim's CDI spec adds this hook; the runtime runs it on the host after it created the container's cgroup and
before the container's process starts, with the OCI state (pid, bundle, annotations) on stdin. It reads the
container's DRA_CPUSET_<uid> variables from the bundle's config.json, trusts each only when the driver's own spec
for that claim (in --cdi-dir) names the same cpuset and, when the runtime names the pod, lists the pod among the
claim's reservedFor pods, then writes the union of the claims' CPUs to the container's cgroup, and the memory nodes
of its strict claims (core/entitlement.memory_placement): a container without one keeps every memory node. A hook
cannot set a memory policy.

What it cannot do: keep other containers off the claimed CPUs (no shared pool), or re-pin a container after a
later resource update of the runtime. Prefer NRI wherever the runtime has it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dra_cpu.core import cdi_spec
from dra_cpu.core.cdi_spec import CDIError
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.entitlement import Entitlement, memory_placement, refusal
from dra_cpu.errors import DraCpuError
from dra_cpu.node.cgroups import cpuset_dir_of_pid, write_cpuset
from dra_cpu.store.cdi_files import CDIStore

LOG = logging.getLogger("dra_cpu.cdihook")
DEFAULT_CDI_DIR = Path("/var/run/cdi")
LIMITATION = (
    "enforcement cdi-hook pins claimed containers only: it cannot keep other containers off the claimed CPUs "
    "(no shared pool) nor re-pin after a runtime resource update; use NRI where the runtime has it"
)
"""The line the daemon logs (warning) at start in this mode."""
# Where runtimes put the pod's UID in the OCI annotations: containerd's CRI, then CRI-O.
POD_UID_ANNOTATIONS = ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid")


def hook(
    executable: str | Path,
    *,
    cdi_dir: Path = DEFAULT_CDI_DIR,
    driver: str = "dra.cpu",
    command: Sequence[str] = ("cdi-hook",),
) -> dict[str, object]:
    """The CDI containerEdits.hooks entry that runs `<executable> <command...>` (Driver.cdi_hooks)."""
    return {
        "hookName": "createRuntime",
        "path": str(executable),
        "args": [str(executable), *command, "--cdi-dir", str(cdi_dir), "--driver", driver],
    }


@dataclass(frozen=True)
class HookPin:
    cpus: CPUSet
    mems: CPUSet
    claims: tuple[str, ...]


def pin_for(
    env: Sequence[str], pod_uid: str, specs: Mapping[str, Mapping[str, str] | None]
) -> tuple[HookPin, list[str]]:
    """Pure: the container's env and the driver's spec env per claim uid -> what to pin, and why entries were
    refused. `specs[uid]` is None when the driver has no spec for that claim."""
    granted: dict[str, Entitlement] = {}
    refused = []
    for uid, value in cdi_spec.claimed_cpusets(env).items():
        prepared = _entitlement(uid, specs.get(uid))
        reason = refusal(value, pod_uid, prepared)
        if reason or prepared is None:
            refused.append(f"claim {uid}: {reason}")
        else:
            granted[uid] = prepared
    mems, _ = memory_placement(list(granted.values()), CPUSet())
    return HookPin(CPUSet.union_all(e.cpus for e in granted.values()), mems, tuple(granted)), refused


def _entitlement(uid: str, spec: Mapping[str, str] | None) -> Entitlement | None:
    """What the driver's spec says it prepared for the claim; None without a readable spec."""
    if spec is None:
        return None
    try:
        claim = cdi_spec.grant_from_env(spec, uid, "", ClaimRef("", "", uid))
        mems = CPUSet.parse(spec.get(f"{cdi_spec.ENV_MEMS}{uid}", ""))
    except DraCpuError:
        return None
    return Entitlement(claim.cpus, mems, claim.pod_uids, claim.binding, claim.hugepage_nodes)


def _load_json(source: TextIO | Path, what: str) -> Any:
    try:
        return json.load(source) if not isinstance(source, Path) else json.loads(source.read_text())
    except (OSError, ValueError) as err:
        raise DraCpuError(f"cannot read the {what}: {err}") from None


def _spec_env(store: CDIStore, uid: str) -> dict[str, str] | None:
    try:
        return cdi_spec.env_of_spec(store.read(uid))
    except CDIError:
        return None


def run_hook(cdi_dir: Path, driver: str, stdin: TextIO) -> HookPin:
    state = _load_json(stdin, "OCI state on stdin")
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int) or not state.get("bundle"):
        raise DraCpuError(f"the OCI state on stdin has no pid and bundle: {str(state)[:200]!r}")
    config = _load_json(Path(state["bundle"]) / "config.json", f"bundle config of container {state.get('id')}")
    env = [str(e) for e in config.get("process", {}).get("env", [])]
    annotations = {**config.get("annotations", {}), **(state.get("annotations") or {})}
    pod_uid = next((str(annotations[a]) for a in POD_UID_ANNOTATIONS if a in annotations), "")
    store = CDIStore(cdi_dir, driver)
    specs = {uid: _spec_env(store, uid) for uid in cdi_spec.claimed_cpusets(env)}
    pin, refused = pin_for(env, pod_uid, specs)
    for reason in refused:
        LOG.warning(
            "container env names a claim it is not entitled to", extra={"container": state.get("id"), "reason": reason}
        )
    if pin.cpus:
        directory = cpuset_dir_of_pid(state["pid"])
        write_cpuset(directory, pin.cpus, pin.mems)
        LOG.info(
            "container pinned (cdi-hook: the shared pool is not maintained)",
            extra={
                "container": state.get("id"),
                "claims": ",".join(pin.claims),
                "cpus": str(pin.cpus),
                "mems": str(pin.mems),
                "cgroup": str(directory),
            },
        )
    return pin
