"""What the scheduler sees of claims, DeviceClasses and ResourceSlices, as values. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from dra_cpu.core.quantity import format_bytes
from dra_cpu.errors import DraCpuError
from dra_cpu.tools.cel.library import AttributeValue, CelDevice
from dra_cpu.tools.cel.selector import Selector


class ExplainInputError(DraCpuError):
    """A claim, class, slice or claim in use that is not what the API would accept; names the field and value."""


def number(value: Fraction) -> str:
    """Byte-sized amounts in binary units (no CPU count reaches a mebibyte), the rest as plain numbers."""
    if value.denominator != 1:
        return str(float(value))
    if value >= 1 << 20 and value.numerator % (1 << 20) == 0:
        return format_bytes(value.numerator)
    return str(value.numerator)


@dataclass(frozen=True)
class Capacity:
    value: Fraction
    default: Fraction | None = None
    valid_values: tuple[Fraction, ...] = ()
    minimum: Fraction | None = None
    maximum: Fraction | None = None
    step: Fraction | None = None

    def rounded(self, amount: Fraction) -> Fraction | None:
        """What a request for `amount` consumes under the requestPolicy; None when no valid amount covers it."""
        if self.valid_values:
            return next((v for v in self.valid_values if v >= amount), None)
        if self.minimum is not None:
            taken = self.minimum
            if amount > self.minimum and self.step:
                taken = self.minimum + math.ceil((amount - self.minimum) / self.step) * self.step
            elif amount > self.minimum:
                taken = amount
            limit = self.maximum if self.maximum is not None else self.value
            return taken if taken <= limit else None
        return amount

    @property
    def unrequested(self) -> Fraction:
        """What an allocation that does not name this capacity consumes."""
        return self.default if self.default is not None else self.value


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class SliceDevice:
    driver: str
    pool: str
    node: str | None
    name: str
    attributes: Mapping[str, AttributeValue]
    capacity: Mapping[str, Capacity]
    allow_multiple: bool
    taints: tuple[Taint, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return self.driver, self.pool, self.name

    def cel(self) -> CelDevice:
        return CelDevice(
            self.driver,
            self.attributes,
            {k: c.value for k, c in self.capacity.items()},
            self.allow_multiple,
        )


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: str
    value: str
    effect: str

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if not self.key:
            return self.operator == "Exists"
        return self.key == taint.key and (self.operator == "Exists" or self.value == taint.value)


@dataclass(frozen=True)
class Alternative:
    """An `exactly` request or one `firstAvailable` subrequest; `name` is `request` or `request/subrequest`."""

    name: str
    class_name: str
    selectors: tuple[Selector, ...]
    all_devices: bool
    count: int
    capacity: tuple[tuple[str, Fraction], ...]
    admin_access: bool = False
    tolerations: tuple[Toleration, ...] = ()


@dataclass(frozen=True)
class Request:
    name: str
    alternatives: tuple[Alternative, ...]
    first_available: bool


@dataclass(frozen=True)
class Constraint:
    requests: tuple[str, ...]
    attribute: str
    distinct: bool

    def covers(self, alternative: str) -> bool:
        return not self.requests or alternative in self.requests or alternative.split("/", 1)[0] in self.requests

    def __str__(self) -> str:
        kind = "distinctAttribute" if self.distinct else "matchAttribute"
        return f"{kind} {self.attribute} over {', '.join(self.requests) or 'all requests'}"


@dataclass(frozen=True)
class Claim:
    name: str
    requests: tuple[Request, ...]
    constraints: tuple[Constraint, ...]


@dataclass(frozen=True)
class DeviceClass:
    name: str
    selectors: tuple[Selector, ...]


@dataclass(frozen=True)
class Held:
    """One allocation result on a device: the claim (`namespace/name`) and its consumedCapacity."""

    claim: str
    consumed: tuple[tuple[str, Fraction], ...]


@dataclass(frozen=True)
class Usage:
    """What allocated claims hold of one device."""

    held: tuple[Held, ...] = ()

    @property
    def holders(self) -> tuple[str, ...]:
        return tuple(sorted({h.claim for h in self.held}))


def held_amount(device: SliceDevice, usage: Usage, key: str, claim: str | None = None) -> Fraction:
    """What allocated claims (or just `claim`) hold of a capacity. A result that recorded no consumedCapacity at
    all holds what an allocation that names no capacity takes: the policy default, or everything."""
    total = Fraction(0)
    for held in usage.held:
        if claim is not None and held.claim != claim:
            continue
        if not held.consumed:
            total += device.capacity[key].unrequested
        total += sum((amount for k, amount in held.consumed if k == key), Fraction(0))
    return total
