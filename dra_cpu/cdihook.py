"""`dra-cpu cdi-hook`: the createRuntime hook of `--enforcement cdi-hook`, for runtimes without NRI.

The claim's CDI spec adds this hook; the runtime runs it on the host after it created the container's cgroup and
before the container's process starts, with the OCI state (pid, bundle, annotations) on stdin. It reads the
container's DRA_CPUSET_<uid> variables from the bundle's config.json, trusts each only when the driver's own spec
for that claim (in --cdi-dir) names the same cpuset and, when the runtime names the pod, lists the pod among the
claim's reservedFor pods, then writes the union of the claims' CPUs and memory nodes to the container's cgroup.

What it cannot do: keep other containers off the claimed CPUs (no shared pool), or re-pin a container after a
later resource update of the runtime. Prefer NRI wherever the runtime has it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dra_cpu import cdi
from dra_cpu.cdi import CDIError, CDIStore
from dra_cpu.cgroups import CgroupError, cpuset_dir_of_pid, write_cpuset
from dra_cpu.cpuset import CPUSet
from dra_cpu.errors import DraCpuError

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
class Grant:
    cpus: CPUSet
    mems: CPUSet
    claims: tuple[str, ...]


def decide(env: Sequence[str], pod_uid: str, specs: Mapping[str, Mapping[str, str] | None]) -> tuple[Grant, list[str]]:
    """Pure: the container's env and the driver's spec env per claim uid -> what to pin, and why entries were
    refused. `specs[uid]` is None when the driver has no spec for that claim."""
    cpus, mems, claims, refused = CPUSet(), CPUSet(), [], []
    for uid, value in cdi.claimed_cpusets(env).items():
        key = f"{cdi.ENV_CPUSET}{uid}"
        spec = specs.get(uid)
        pods = spec.get(f"{cdi.ENV_PODS}{uid}", "").split(",") if spec else []
        if spec is None:
            refused.append(f"claim {uid}: the driver has no CDI spec for it")
        elif spec.get(key) != value:
            refused.append(f"claim {uid}: cpuset {value!r} is not the prepared one ({spec.get(key)!r})")
        elif pod_uid and pod_uid not in pods:
            refused.append(f"claim {uid}: pod {pod_uid} is not among its reservedFor pods ({','.join(pods)})")
        else:
            cpus |= CPUSet.parse(value)
            mems |= CPUSet.parse(spec.get(f"{cdi.ENV_MEMS}{uid}", ""))
            claims.append(uid)
    return Grant(cpus, mems, tuple(claims)), refused


def _load_json(source: TextIO | Path, what: str) -> Any:
    try:
        return json.load(source) if not isinstance(source, Path) else json.loads(source.read_text())
    except (OSError, ValueError) as err:
        raise DraCpuError(f"cannot read the {what}: {err}") from None


def _spec_env(store: CDIStore, uid: str) -> dict[str, str] | None:
    try:
        return cdi.env_of_spec(store.read(uid))
    except CDIError:
        return None


def run(cdi_dir: Path, driver: str, stdin: TextIO) -> Grant:
    state = _load_json(stdin, "OCI state on stdin")
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int) or not state.get("bundle"):
        raise DraCpuError(f"the OCI state on stdin has no pid and bundle: {str(state)[:200]!r}")
    config = _load_json(Path(state["bundle"]) / "config.json", f"bundle config of container {state.get('id')}")
    env = [str(e) for e in config.get("process", {}).get("env", [])]
    annotations = {**config.get("annotations", {}), **(state.get("annotations") or {})}
    pod_uid = next((str(annotations[a]) for a in POD_UID_ANNOTATIONS if a in annotations), "")
    store = CDIStore(cdi_dir, driver)
    specs = {uid: _spec_env(store, uid) for uid in cdi.claimed_cpusets(env)}
    grant, refused = decide(env, pod_uid, specs)
    for reason in refused:
        LOG.warning(
            "container env names a claim it is not entitled to", extra={"container": state.get("id"), "reason": reason}
        )
    if grant.cpus:
        directory = cpuset_dir_of_pid(state["pid"])
        write_cpuset(directory, grant.cpus, grant.mems)
        LOG.info(
            "container pinned (cdi-hook: the shared pool is not maintained)",
            extra={
                "container": state.get("id"),
                "claims": ",".join(grant.claims),
                "cpus": str(grant.cpus),
                "mems": str(grant.mems),
                "cgroup": str(directory),
            },
        )
    return grant


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cdi-dir", type=Path, default=DEFAULT_CDI_DIR, help="the driver's CDI spec folder")
    parser.add_argument("--driver", default="dra.cpu", help="the DRA driver name")


def run_hook(args: argparse.Namespace, stdin: TextIO = sys.stdin) -> int:
    """0 when done (pinned, or nothing to pin); 1 when a claimed container could not be pinned, which makes the
    runtime fail the container rather than run it unpinned."""
    try:
        run(args.cdi_dir, args.driver, stdin)
    except (CgroupError, DraCpuError) as err:
        LOG.error("cdi-hook failed", extra={"reason": str(err)})
        return 1
    return 0


def main(argv: Sequence[str], stdin: TextIO = sys.stdin) -> int:
    parser = argparse.ArgumentParser(prog="dra-cpu cdi-hook", description="OCI createRuntime hook: pin to claims")
    add_arguments(parser)
    return run_hook(parser.parse_args(argv), stdin)


if __name__ == "__main__":
    from dra_cpu import logs

    logs.setup()
    sys.exit(main(sys.argv[1:]))
