"""The runtime's containers as the NRI plugin knows them, and the pin each was last given.

Not locked itself: the enforcer holds its one lock around every use, together with the pools the pins come from,
so that a container the runtime creates while the pools change is never left with a pin of the old pools.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dra_cpu.core.entitlement import ContainerInfo, Pin


@dataclass(frozen=True)
class Tracked:
    info: ContainerInfo
    running: bool = True


class ContainerTable:
    def __init__(self) -> None:
        self._containers: dict[str, Tracked] = {}
        self._applied: dict[str, Pin] = {}

    def get(self, container_id: str) -> Tracked | None:
        return self._containers.get(container_id)

    def replace(self, containers: Iterable[ContainerInfo]) -> None:
        """The runtime's whole list (at synchronization): nothing is applied yet."""
        self._containers = {c.id: Tracked(c) for c in containers}
        self._applied = {}

    def track(self, info: ContainerInfo) -> None:
        """Know a container (again) as running; its applied pin is kept."""
        self._containers[info.id] = Tracked(info)

    def track_if_new(self, info: ContainerInfo) -> None:
        self._containers.setdefault(info.id, Tracked(info))

    def applied(self, container_id: str) -> Pin | None:
        return self._applied.get(container_id)

    def set_applied(self, container_id: str, pin: Pin) -> None:
        self._applied[container_id] = pin

    def forget_applied(self, container_ids: Iterable[str]) -> None:
        """These pins may not be what the runtime has: they are pending again."""
        for container_id in container_ids:
            self._applied.pop(container_id, None)

    def forget_all_applied(self) -> None:
        self._applied.clear()

    def stopped(self, container_id: str) -> None:
        tracked = self._containers.get(container_id)
        if tracked is not None:
            self._containers[container_id] = Tracked(tracked.info, running=False)
        self._applied.pop(container_id, None)

    def removed(self, container_id: str) -> bool:
        """Forget a container; False when it was never known."""
        self._applied.pop(container_id, None)
        return self._containers.pop(container_id, None) is not None

    def pending(self, pin_of: Callable[[ContainerInfo], Pin | None]) -> list[tuple[str, Pin]]:
        """The running containers whose pin (`pin_of`; None: leave it as it is) differs from the one last applied,
        marked applied."""
        out = []
        for container_id, tracked in self._containers.items():
            if not tracked.running:
                continue
            pin = pin_of(tracked.info)
            if pin is not None and self._applied.get(container_id) != pin:
                self._applied[container_id] = pin
                out.append((container_id, pin))
        return out
