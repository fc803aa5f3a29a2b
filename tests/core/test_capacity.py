"""core/capacity.py: which CPUs the node keeps from claims (reserved, cut, kept for the shared pool) and why, and the
settings it cannot honour. tests/core/test_published.py checks that the devices built from it promise nothing
prepare refuses; these pin down which CPUs are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from dra_cpu.core.capacity import settings_problems, split_cpus
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS
from tests.harness.synthetic_sysfs import uniform_machine, write_tree

DUAL = read_topology(SYSFS / "dual-socket-smt2")  # 2 NUMA nodes of 8 CPUs, siblings (0,1), (2,3), ...


def node(reserved: str = "", *, strict_reserved: bool = False, whole_cores: bool = False) -> DeviceConfig:
    return DeviceConfig(
        node_name="n", reserved_cpus=CPUSet.parse(reserved), strict_reserved=strict_reserved, whole_cores=whole_cores
    )


@pytest.mark.parametrize(
    ("config", "reserved", "cut", "kept"),
    [
        (node(), "", "", "0"),
        (DeviceConfig(node_name="n", min_shared_cpus=3), "", "", "0-2"),
        # Reserved CPUs are shared (unless strictReserved): they count towards the floor.
        (node("0"), "0", "", ""),
        (DeviceConfig(node_name="n", reserved_cpus=CPUSet.of([0]), min_shared_cpus=2), "0", "", "1"),
        # strictReserved keeps containers off them: the floor is taken beside them, the reserved CPU's sibling first.
        (node("2", strict_reserved=True), "2", "", "3"),
        # Whole cores: the reserved CPU's sibling is cut, and shared; a kept CPU takes its whole core.
        (node("2", whole_cores=True), "2", "3", ""),
        (
            DeviceConfig(node_name="n", reserved_cpus=CPUSet.of([2]), whole_cores=True, min_shared_cpus=3),
            "2",
            "3",
            "0-1",
        ),
        (node(whole_cores=True), "", "", "0-1"),
    ],
)
def test_what_is_kept_from_claims(config: DeviceConfig, reserved: str, cut: str, kept: str) -> None:
    split = split_cpus(DUAL, config)
    assert (str(split.reserved), str(split.cut), str(split.kept_shared)) == (reserved, cut, kept)
    assert split.claimable == DUAL.online_cpus - split.reserved - split.cut - split.kept_shared
    assert not settings_problems(DUAL, config)


def test_an_isolated_sibling_does_not_draw_the_shared_pool(tmp_path: Path) -> None:
    """Core 1 (CPUs 1, 3) has its thread 3 on isolcpus: its other thread is not kept shared before core 0's, so that
    a poller on CPU 3 gets no busy neighbour from the shared pool."""
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=2, threads=2)
    topology = read_topology(write_tree(tmp_path, cpus, nodes, isolated=CPUSet.parse("3")))
    split = split_cpus(topology, DeviceConfig(node_name="n"))
    assert (str(split.kept_shared), str(split.claimable)) == ("0", "1-3")


def test_a_floor_the_node_cannot_hold_is_a_problem_naming_the_numbers() -> None:
    config = DeviceConfig(node_name="n", reserved_cpus=CPUSet.parse("0-13"), strict_reserved=True, min_shared_cpus=4)
    split = split_cpus(DUAL, config)
    assert (split.shortfall, str(split.kept_shared), str(split.claimable)) == (2, "14-15", "")
    assert settings_problems(DUAL, config) == (
        "minSharedCpus 4: this node has 2 CPU(s) to share (online 0-15, isolated none, reservedCpus 0-13 with "
        "strictReserved); keeping 4 for containers without claims leaves no CPU outside isolcpus for claims",
    )
