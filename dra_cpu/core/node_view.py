"""What the driver knows of its node at one moment, as one immutable value: the topology as discovered, the devices
published for it, and the settings the operator chose. Pure.

A `NodeView` is replaced whole, never changed: re-discovery makes a new one (`with_topology`), whose devices are
built from its own topology, so that whoever holds a view sees a topology and the devices published for it, never a
new topology with old devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from dra_cpu.core.devices import Device, DeviceConfig, build_devices, device_index, memory_capacity
from dra_cpu.core.topology import Topology


@dataclass(frozen=True)
class NodeSettings:
    """The settings decisions and derived files depend on (config.Config makes them from the operator's)."""

    # What is published, and so the shared-CPU floor and strictReserved (DeviceConfig.shared_floor).
    devices: DeviceConfig
    # KEP-5304: whether a prepare records and writes the claim's device metadata files.
    device_metadata: bool = True
    # CDI containerEdits.hooks of every claim's spec (`--enforcement cdi-hook`).
    cdi_hooks: tuple[Mapping[str, object], ...] = ()

    @property
    def driver_name(self) -> str:
        return self.devices.driver_name

    @property
    def pool(self) -> str:
        """The ResourceSlice pool of this node's devices: the node's name."""
        return self.devices.node_name


@dataclass(frozen=True)
class NodeView:
    topology: Topology
    devices: tuple[Device, ...]
    settings: NodeSettings

    @classmethod
    def of(cls, topology: Topology, settings: NodeSettings) -> NodeView:
        """The view of a topology: its devices as the settings publish them (DeviceConfigError when none can be)."""
        return cls(topology, build_devices(topology, settings.devices), settings)

    def with_topology(self, topology: Topology) -> NodeView:
        return NodeView.of(topology, self.settings)

    @cached_property
    def device_index(self) -> Mapping[str, Device]:
        """The published devices by name."""
        return device_index(self.devices)

    @cached_property
    def memory_capacity(self) -> Mapping[int, int]:
        """NUMA node -> the memory claims may get there (its memory device's capacity); a node without any is absent."""
        return memory_capacity(self.devices)
