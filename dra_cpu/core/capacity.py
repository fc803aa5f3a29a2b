"""Which CPUs claims may get, and why the others are kept from them: one computation for the published devices,
prepare's shared-CPU floor, the settings check at start and the metrics. Pure.

Every online CPU is in exactly one part of a CpuSplit:
- `claimable`: published as device capacity (isolated CPUs on devices of their own);
- `reserved`: `reservedCpus`, never given to claims;
- `cut`: with `wholeCores`, the threads of cores that cannot be handed out whole (a thread reserved, or a core
  half isolated: its isolated and its other threads are on different devices);
- `kept_shared`: held back so that the shared pool never drops below `minSharedCpus`.

The floor is held back as a fixed set of CPUs, as `reservedCpus` is, rather than by publishing less capacity on some
device: the scheduler counts capacity per device and cannot see a limit over several devices, individual mode has
no capacity to lower, and a fixed set keeps the shared pool where the node's daemons already run. Only what the
floor still lacks is held back: CPUs that are never claimable (reserved ones, unless strictReserved keeps
containers off them; cut ones) count towards it first. The set is the lowest cores, those that already have a
thread outside claims first (a reserved CPU's sibling before a core of its own), whole cores with `wholeCores`.
So the scheduler is never offered a CPU that prepare would refuse for the floor: what the slices allow, prepare
grants (tests/core/test_published.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError

if TYPE_CHECKING:
    from dra_cpu.core.devices import DeviceConfig


class SettingsError(DraCpuError):
    """Settings that contradict the node they run on; one line per contradiction, joined."""


@dataclass(frozen=True)
class SharedFloor:
    """What the shared pool (where every container without a claim runs) must keep: `minimum` CPUs
    (`minSharedCpus`), not counting `excluded` CPUs, which are never in it (the reserved CPUs with `strictReserved`)."""

    minimum: int = 1
    excluded: CPUSet = field(default_factory=CPUSet)

    def pool(self, topology: Topology, claimed: CPUSet) -> CPUSet:
        """The shared pool while claims hold `claimed`: online CPUs neither claimed, isolated nor excluded."""
        return topology.online_cpus - topology.isolated_cpus - claimed - self.excluded


DEFAULT_FLOOR = SharedFloor()
"""minSharedCpus' default: one CPU."""


@dataclass(frozen=True)
class CpuSplit:
    """The node's online CPUs by what claims may get (see the module's docstring)."""

    claimable: CPUSet
    reserved: CPUSet
    cut: CPUSet
    kept_shared: CPUSet
    floor: SharedFloor
    # What the floor lacks with every claimable CPU outside isolcpus claimed: above 0 only when the node has fewer
    # CPUs to share than minSharedCpus (then nothing outside isolcpus is claimable).
    shortfall: int = 0


def split_cpus(topology: Topology, config: DeviceConfig) -> CpuSplit:
    """Reserved CPUs that are not online here are ignored (settings_problems() reports those that do not exist)."""
    online, isolated, reserved, floor = (
        topology.online_cpus,
        topology.isolated_cpus,
        config.reserved_cpus,
        config.shared_floor,
    )
    candidates = online - reserved
    if config.whole_cores:
        candidates = CPUSet.union_all(
            core
            for core in topology.cores(candidates)
            if core == topology.cpu(core.first()).thread_siblings and len({c in isolated for c in core}) == 1
        )
    general = candidates - isolated
    lacking = floor.minimum - len(floor.pool(topology, candidates))
    kept = _kept_shared(topology, candidates, lacking, config.whole_cores) if lacking > 0 else CPUSet()
    return CpuSplit(
        claimable=candidates - kept,
        reserved=online & reserved,
        cut=online - reserved - candidates,
        kept_shared=kept,
        floor=floor,
        shortfall=max(0, lacking - len(general)),
    )


def _kept_shared(topology: Topology, candidates: CPUSet, count: int, whole_cores: bool) -> CPUSet:
    """`count` CPUs of the claimable CPUs outside isolcpus (whole cores with `whole_cores`, so possibly a few more),
    deterministically."""

    def order(core: CPUSet) -> tuple[bool, int]:
        # A core with a thread that no claim can get (reserved, cut) first, then by first CPU. A thread on isolcpus
        # does not count: it is claimable, and a poller there wants no shared neighbour.
        return not topology.cpu(core.first()).thread_siblings - candidates, core.first()

    kept: list[int] = []
    for core in sorted(topology.cores(candidates - topology.isolated_cpus), key=order):
        for cpu in core if whole_cores else core.sorted()[: count - len(kept)]:
            kept.append(cpu)
        if len(kept) >= count:
            break
    return CPUSet.of(kept)


def settings_problems(topology: Topology, config: DeviceConfig) -> tuple[str, ...]:
    """Why `config` contradicts this node, one line each naming the setting, its value and the node's numbers; ()
    when it does not. At start they are fatal (check_settings); at re-discovery they are reported."""
    problems = []
    reserved, split = config.reserved_cpus, split_cpus(topology, config)
    unknown = reserved - topology.present_cpus
    if unknown:
        problems.append(
            f"reservedCpus {reserved}: CPU(s) {unknown} do not exist on this node (present: {topology.present_cpus})"
        )
    online, isolated = topology.online_cpus, topology.isolated_cpus
    node = (
        f"online {online or 'none'}, isolated {isolated or 'none'}, reservedCpus {split.reserved or 'none'}"
        f"{' with strictReserved' if split.floor.excluded else ''}"
        f"{f', cut by wholeCores {split.cut}' if split.cut else ''}"
    )
    general = split.claimable - isolated
    if not general and (split.kept_shared or split.shortfall):
        shareable = len(split.floor.pool(topology, CPUSet()))
        problems.append(
            f"minSharedCpus {split.floor.minimum}: this node has {shareable} CPU(s) to share ({node}); keeping "
            f"{split.floor.minimum} for containers without claims leaves no CPU outside isolcpus for claims"
        )
    elif not split.claimable:
        problems.append(f"no CPU is left for claims ({node})")
    return tuple(problems)


def check_settings(topology: Topology, config: DeviceConfig) -> None:
    problems = settings_problems(topology, config)
    if problems:
        raise SettingsError("; ".join(problems))
