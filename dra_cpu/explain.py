"""`dra-cpu explain`: why a ResourceClaim fits a node or leaves its pod Pending, before or after it is applied.

The core is pure: claim + DeviceClasses + ResourceSlices + claims in use -> Explanation. It follows the scheduler's
structured allocator: each request's class and own CEL selectors, capacity rounded by the device's requestPolicy
against what allocated claims consumed, allocationMode and count, `firstAvailable` subrequests in order, and the
claim's matchAttribute/distinctAttribute constraints, all on one node. The thin shell at the end reads files or the
API server and prints.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from dra_cpu.cel import AttributeValue, CelDevice, Selector, Semver, compile_selector
from dra_cpu.errors import DraCpuError
from dra_cpu.fileio import read_yaml
from dra_cpu.quantity import QuantityError, format_bytes, parse_quantity

# Enough for every claim a person writes; a claim that needs more is reported as undecided, not as unsatisfiable.
SEARCH_STEPS = 200_000
EXIT_UNSATISFIABLE = 1


class ExplainInputError(DraCpuError):
    """A claim, class, slice or claim in use that is not what the API would accept; names the field and value."""


def number(value: Fraction) -> str:
    """Byte-sized amounts in binary units (no CPU count reaches a mebibyte), the rest as plain numbers."""
    if value.denominator != 1:
        return str(float(value))
    if value >= 1 << 20 and value.numerator % (1 << 20) == 0:
        return format_bytes(value.numerator)
    return str(value.numerator)


# ----------------------------------------------------------------------------------------------------------------
# The model: what the scheduler sees, parsed and checked.


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


# ----------------------------------------------------------------------------------------------------------------
# The result.


@dataclass(frozen=True)
class DeviceCheck:
    device: str
    fits: bool
    reason: str
    # The capacity this alternative would take from the device, qualified key -> amount.
    takes: tuple[tuple[str, Fraction], ...] = ()
    cel_error: bool = False


@dataclass(frozen=True)
class AlternativeResult:
    alternative: Alternative
    checks: tuple[DeviceCheck, ...]
    problem: str = ""

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(c.device for c in self.checks if c.fits)

    def as_dict(self) -> dict[str, Any]:
        alt = self.alternative
        data: dict[str, Any] = {
            "name": alt.name,
            "deviceClassName": alt.class_name,
            "allocationMode": "All" if alt.all_devices else "ExactCount",
            "capacity": {key: number(amount) for key, amount in alt.capacity},
            "candidates": list(self.candidates),
            "reasons": {c.device: c.reason for c in self.checks if not c.fits},
            "details": {c.device: c.reason for c in self.checks if c.fits and c.reason},
        }
        if not alt.all_devices:
            data["count"] = alt.count
        if self.problem:
            data["problem"] = self.problem
        return data


@dataclass(frozen=True)
class RequestResult:
    request: Request
    alternatives: tuple[AlternativeResult, ...]
    chosen: str | None = None
    devices: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        own = [a.as_dict() for a in self.alternatives]
        candidates = list(dict.fromkeys(d for a in self.alternatives for d in a.candidates))
        reasons: dict[str, str] = {}
        for alt in self.alternatives:
            for check in alt.checks:
                if check.device not in candidates:
                    prefix = f"{alt.alternative.name}: " if self.request.first_available else ""
                    reasons[check.device] = "; ".join(filter(None, [reasons.get(check.device), prefix + check.reason]))
        data: dict[str, Any] = {"name": self.request.name, "candidates": candidates, "reasons": reasons}
        if self.request.first_available:
            data["subrequests"] = own
        else:
            data.update({k: v for k, v in own[0].items() if k not in ("name", "candidates", "reasons")})
        data["allocated"] = {"subrequest": self.chosen, "devices": list(self.devices)} if self.chosen else None
        return data


@dataclass(frozen=True)
class Explanation:
    claim: str
    satisfiable: bool
    node: str | None
    requests: tuple[RequestResult, ...]
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "claim": self.claim,
            "satisfiable": self.satisfiable,
            "node": self.node,
            "reason": self.reason or None,
            "requests": [r.as_dict() for r in self.requests],
        }


# ----------------------------------------------------------------------------------------------------------------
# Parsing API objects (dicts in the server's JSON shape) into the model.


@dataclass(frozen=True)
class _At:
    """A position in an input object, for error messages: `claim.yaml: spec.devices.requests[0].name`."""

    source: str
    path: str = ""

    def __truediv__(self, part: str | int) -> _At:
        if isinstance(part, int):
            return _At(self.source, f"{self.path}[{part}]")
        return _At(self.source, f"{self.path}.{part}" if self.path else part)

    def fail(self, what: str) -> ExplainInputError:
        return ExplainInputError(f"{self.source}: {self.path or 'the object'} {what}")

    def mapping(self, value: Any, *, optional: bool = True) -> Mapping[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(f"must be an object, not {value!r}")
        return value

    def items(self, value: Any) -> Iterator[tuple[_At, Any]]:
        if value is None:
            return
        if not isinstance(value, list):
            raise self.fail(f"must be a list, not {value!r}")
        for index, item in enumerate(value):
            yield self / index, item

    def string(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"must be a non-empty string, not {value!r}")
        return value

    def quantity(self, value: Any) -> Fraction:
        try:
            return parse_quantity(value if isinstance(value, int | str) else repr(value))
        except QuantityError:
            raise self.fail(f"must be a quantity, not {value!r}") from None


def _qualified(key: str, driver: str) -> str:
    """Attribute and capacity names without a domain are in the driver's own domain."""
    return key if "/" in key else f"{driver}/{key}"


def _describe(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "?") if isinstance(metadata, Mapping) else "?"
    namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
    return f"{obj.get('kind', 'object')} {namespace + '/' if namespace else ''}{name}"


def parse_class(obj: Mapping[str, Any], source: str) -> DeviceClass:
    at = _At(source)
    name = (at / "metadata" / "name").string(at.mapping(obj.get("metadata")).get("name"))
    spec = (at / "spec").mapping(obj.get("spec"))
    return DeviceClass(name, _selectors(at / "spec" / "selectors", spec.get("selectors"), f"DeviceClass {name}"))


def _selectors(at: _At, value: Any, owner: str) -> tuple[Selector, ...]:
    selectors = []
    for item_at, item in at.items(value):
        cel = (item_at / "cel").mapping(item_at.mapping(item, optional=False).get("cel"), optional=False)
        expression = (item_at / "cel" / "expression").string(cel.get("expression"))
        selectors.append(compile_selector(expression, f"{owner} {item_at.path.rsplit('.', 1)[-1]}"))
    return tuple(selectors)


def parse_claim(obj: Mapping[str, Any], source: str) -> Claim:
    """A ResourceClaim, or a ResourceClaimTemplate (its spec.spec)."""
    at = _At(source)
    spec_at = at / "spec"
    spec = spec_at.mapping(obj.get("spec"), optional=False)
    if obj.get("kind") == "ResourceClaimTemplate":
        spec_at = spec_at / "spec"
        spec = spec_at.mapping(spec.get("spec"), optional=False)
    devices_at = spec_at / "devices"
    devices = devices_at.mapping(spec.get("devices"))
    requests = tuple(_request(r_at, r) for r_at, r in (devices_at / "requests").items(devices.get("requests")))
    if not requests:
        raise (devices_at / "requests").fail("is empty: the claim asks for no device")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise (devices_at / "requests").fail(f"has duplicate names: {names}")
    constraints = []
    known = set(names) | {a.name for r in requests for a in r.alternatives}
    for c_at, raw in (devices_at / "constraints").items(devices.get("constraints")):
        item = c_at.mapping(raw, optional=False)
        listed = tuple((c_at / "requests" / i).string(n) for i, n in enumerate(item.get("requests") or []))
        for name in listed:
            if name not in known:
                raise (c_at / "requests").fail(f"names request {name!r}, which the claim does not have ({names})")
        kinds = [k for k in ("matchAttribute", "distinctAttribute") if item.get(k)]
        if len(kinds) != 1:
            raise c_at.fail("must set exactly one of matchAttribute and distinctAttribute")
        attribute = (c_at / kinds[0]).string(item[kinds[0]])
        if "/" not in attribute:
            raise (c_at / kinds[0]).fail(f"{attribute!r} must be fully qualified (domain/name)")
        constraints.append(Constraint(listed, attribute, kinds[0] == "distinctAttribute"))
    return Claim(_describe(obj), requests, tuple(constraints))


def _request(at: _At, raw: Any) -> Request:
    item = at.mapping(raw, optional=False)
    name = (at / "name").string(item.get("name"))
    exactly, first = item.get("exactly"), item.get("firstAvailable")
    if (exactly is None) == (first is None):
        raise at.fail(f"(request {name!r}) must set exactly one of exactly and firstAvailable")
    if exactly is not None:
        return Request(name, (_alternative(at / "exactly", exactly, name),), first_available=False)
    subs = [_alternative(s_at, s, f"{name}/{(s_at / 'name').string(s.get('name'))}") for s_at, s in _subs(at, first)]
    if not subs:
        raise (at / "firstAvailable").fail("is empty")
    return Request(name, tuple(subs), first_available=True)


def _subs(at: _At, value: Any) -> Iterator[tuple[_At, Mapping[str, Any]]]:
    for s_at, s in (at / "firstAvailable").items(value):
        yield s_at, s_at.mapping(s, optional=False)


def _alternative(at: _At, raw: Any, name: str) -> Alternative:
    item = at.mapping(raw, optional=False)
    class_name = (at / "deviceClassName").string(item.get("deviceClassName"))
    mode = item.get("allocationMode") or "ExactCount"
    if mode not in ("ExactCount", "All"):
        raise (at / "allocationMode").fail(f"must be ExactCount or All, not {mode!r}")
    count = item.get("count", 1)
    if mode == "ExactCount" and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise (at / "count").fail(f"must be a positive integer, not {count!r}")
    capacity = (at / "capacity").mapping(item.get("capacity"))
    requests = (at / "capacity" / "requests").mapping(capacity.get("requests"))
    amounts = tuple((str(k), (at / "capacity" / "requests" / str(k)).quantity(v)) for k, v in requests.items())
    tolerations = tuple(
        Toleration(
            str(t.get("key", "")), str(t.get("operator", "Equal")), str(t.get("value", "")), str(t.get("effect", ""))
        )
        for t_at, raw_t in (at / "tolerations").items(item.get("tolerations"))
        for t in [t_at.mapping(raw_t, optional=False)]
    )
    return Alternative(
        name=name,
        class_name=class_name,
        selectors=_selectors(at / "selectors", item.get("selectors"), f"request {name}"),
        all_devices=mode == "All",
        count=count if mode == "ExactCount" else 0,
        capacity=amounts,
        admin_access=bool(item.get("adminAccess")),
        tolerations=tolerations,
    )


def parse_slices(objs: Iterable[Mapping[str, Any]], source: str) -> tuple[SliceDevice, ...]:
    """Devices of the newest generation of each pool, in slice order (the scheduler ignores older generations)."""
    slices = []
    for index, obj in enumerate(objs):
        at = _At(f"{source}: {_describe(obj)}", "spec")
        spec = at.mapping(obj.get("spec"), optional=False)
        driver = (at / "driver").string(spec.get("driver"))
        pool = (at / "pool").mapping(spec.get("pool"), optional=False)
        pool_name = (at / "pool" / "name").string(pool.get("name"))
        generation = pool.get("generation", 0)
        slices.append((index, at, spec, driver, pool_name, generation if isinstance(generation, int) else 0))
    newest: dict[tuple[str, str], int] = {}
    for _, _, _, driver, pool_name, generation in slices:
        newest[(driver, pool_name)] = max(generation, newest.get((driver, pool_name), generation))
    devices: list[SliceDevice] = []
    for _, at, spec, driver, pool_name, generation in slices:
        if generation != newest[(driver, pool_name)]:
            continue
        node = spec.get("nodeName") or None
        for d_at, raw in (at / "devices").items(spec.get("devices")):
            devices.append(_device(d_at, raw, driver, pool_name, node if isinstance(node, str) else None))
    return tuple(devices)


def _device(at: _At, raw: Any, driver: str, pool: str, node: str | None) -> SliceDevice:
    item = at.mapping(raw, optional=False)
    name = (at / "name").string(item.get("name"))
    attributes: dict[str, AttributeValue] = {}
    for key, value in (at / "attributes").mapping(item.get("attributes")).items():
        attributes[_qualified(str(key), driver)] = _attribute(at / "attributes" / str(key), value)
    capacity = {
        _qualified(str(key), driver): _capacity(at / "capacity" / str(key), value)
        for key, value in (at / "capacity").mapping(item.get("capacity")).items()
    }
    taints = tuple(
        Taint(str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
        for t_at, raw_t in (at / "taints").items(item.get("taints"))
        for t in [t_at.mapping(raw_t, optional=False)]
    )
    return SliceDevice(
        driver, pool, node, name, attributes, capacity, bool(item.get("allowMultipleAllocations")), taints
    )


def _attribute(at: _At, raw: Any) -> AttributeValue:
    value = at.mapping(raw, optional=False)
    for kind, check in (("bool", bool), ("int", int), ("string", str)):
        if kind in value and isinstance(value[kind], check):
            return value[kind]  # type: ignore[no-any-return]
    if isinstance(value.get("version"), str):
        try:
            return Semver.parse(value["version"])
        except ValueError:
            raise (at / "version").fail(f"must be a semver, not {value['version']!r}") from None
    raise at.fail(f"must hold one of bool, int, string or version, not {dict(value)!r}")


def _capacity(at: _At, raw: Any) -> Capacity:
    item = at.mapping(raw, optional=False)
    value = (at / "value").quantity(item.get("value"))
    policy_at = at / "requestPolicy"
    policy = policy_at.mapping(item.get("requestPolicy"))
    default = (policy_at / "default").quantity(policy["default"]) if "default" in policy else None
    valid = tuple(sorted(v_at.quantity(v) for v_at, v in (policy_at / "validValues").items(policy.get("validValues"))))
    bounds_at = policy_at / "validRange"
    bounds = bounds_at.mapping(policy.get("validRange"))

    def bound(key: str) -> Fraction | None:
        return (bounds_at / key).quantity(bounds[key]) if key in bounds else None

    return Capacity(value, default, valid, bound("min"), bound("max"), bound("step"))


def parse_usage(claims: Iterable[Mapping[str, Any]], source: str, skip: str = "") -> dict[tuple[str, str, str], Usage]:
    """(driver, pool, device) -> what the allocated claims hold; `skip` leaves out the claim being explained."""
    held: dict[tuple[str, str, str], list[Held]] = {}
    for obj in claims:
        name = _describe(obj)
        if name == skip:
            continue
        at = _At(f"{source}: {name}", "status.allocation.devices.results")
        status = _At(at.source, "status").mapping(obj.get("status"))
        allocation = _At(at.source, "status.allocation").mapping(status.get("allocation"))
        devices = _At(at.source, "status.allocation.devices").mapping(allocation.get("devices"))
        for r_at, raw in at.items(devices.get("results")):
            result = r_at.mapping(raw, optional=False)
            driver = (r_at / "driver").string(result.get("driver"))
            key = (driver, (r_at / "pool").string(result.get("pool")), (r_at / "device").string(result.get("device")))
            consumed_at = r_at / "consumedCapacity"
            consumed = tuple(
                (_qualified(str(k), driver), (consumed_at / str(k)).quantity(v))
                for k, v in consumed_at.mapping(result.get("consumedCapacity")).items()
            )
            held.setdefault(key, []).append(Held(name.split(" ", 1)[-1], consumed))
    return {key: Usage(tuple(entries)) for key, entries in held.items()}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def check_device(alt: Alternative, dclass: DeviceClass, device: SliceDevice, usage: Usage, label: str) -> DeviceCheck:
    """One device against one request on its own: selectors, taints, then capacity and availability."""
    cel = device.cel()
    for selector in (*dclass.selectors, *alt.selectors):
        verdict = selector.evaluate(cel)
        if not verdict.matches:
            return DeviceCheck(label, False, verdict.reason, cel_error=verdict.error)
    for taint in device.taints:
        if taint.effect in ("NoSchedule", "NoExecute") and not any(t.tolerates(taint) for t in alt.tolerations):
            return DeviceCheck(label, False, f"tainted {taint.key}={taint.value}:{taint.effect}, not tolerated")
    requested = {_qualified(k, device.driver): v for k, v in alt.capacity}
    for key in requested:
        if key not in device.capacity:
            have = ", ".join(device.capacity) or "none"
            return DeviceCheck(label, False, f"has no capacity {key} (it has: {have})")
    free_for_all = alt.admin_access or not usage.holders
    if not device.allow_multiple:
        if not free_for_all:
            return DeviceCheck(label, False, f"allocated to {', '.join(usage.holders)}")
        for key, wanted in requested.items():
            total = device.capacity[key].value
            if wanted > total:
                return DeviceCheck(label, False, f"{key}: requests {number(wanted)}, the device has {number(total)}")
        return DeviceCheck(label, True, "")
    takes: list[tuple[str, Fraction]] = []
    notes: list[str] = []
    for key, cap in device.capacity.items():
        asked = requested.get(key)
        amount: Fraction | None = cap.rounded(asked) if asked is not None else cap.unrequested
        if amount is None:
            limit = number(cap.maximum if cap.maximum is not None else cap.value)
            allowed = f"valid values {', '.join(map(number, cap.valid_values))}" if cap.valid_values else f"max {limit}"
            return DeviceCheck(
                label, False, f"{key}: requests {number(asked or Fraction(0))}, above the requestPolicy ({allowed})"
            )
        held = Fraction(0) if alt.admin_access else held_amount(device, usage, key)
        free = cap.value - held
        how = _how(asked, amount)
        if amount > free:
            by = f" ({', '.join(usage.holders)} hold {number(held)})" if held else ""
            return DeviceCheck(label, False, f"{key}: {how}, only {number(free)} of {number(cap.value)} free{by}")
        takes.append((key, amount))
        notes.append(f"{key}: {how}, {number(free)} of {number(cap.value)} free")
    return DeviceCheck(label, True, "; ".join(notes), tuple(takes))


def _how(asked: Fraction | None, amount: Fraction) -> str:
    if asked is None:
        return f"takes the default {number(amount)}"
    return f"requests {number(asked)}" + (f", rounded up to {number(amount)}" if amount != asked else "")


@dataclass
class _Search:
    """Backtracking over requests, alternatives and device combinations on one node, as the scheduler does."""

    claim: Claim
    options: list[list[tuple[Alternative, list[tuple[SliceDevice, DeviceCheck]]]]]
    usage: Mapping[tuple[str, str, str], Usage]
    steps: int = 0
    rejections: dict[str, int] = field(default_factory=dict)

    def run(self) -> list[tuple[Alternative, list[SliceDevice]]] | None:
        return self._place(0, [], {})

    def _place(
        self,
        index: int,
        chosen: list[tuple[Alternative, list[SliceDevice]]],
        taken: dict[tuple[tuple[str, str, str], str], Fraction],
    ) -> list[tuple[Alternative, list[SliceDevice]]] | None:
        if index == len(self.options):
            return list(chosen)
        for alt, candidates in self.options[index]:
            for combo in self._combinations(alt, candidates):
                self.steps += 1
                if self.steps > SEARCH_STEPS:
                    return None
                extra = self._fits(alt, combo, chosen, taken)
                if extra is None:
                    continue
                for k, v in extra.items():
                    taken[k] = taken.get(k, Fraction(0)) + v
                chosen.append((alt, [d for d, _ in combo]))
                found = self._place(index + 1, chosen, taken)
                chosen.pop()
                for k, v in extra.items():
                    taken[k] -= v
                if found is not None:
                    return found
        return None

    @staticmethod
    def _combinations(
        alt: Alternative, candidates: list[tuple[SliceDevice, DeviceCheck]]
    ) -> Iterator[tuple[tuple[SliceDevice, DeviceCheck], ...]]:
        if alt.all_devices:
            return iter([tuple(candidates)])
        return itertools.combinations(candidates, alt.count)

    def _fits(
        self,
        alt: Alternative,
        combo: tuple[tuple[SliceDevice, DeviceCheck], ...],
        chosen: list[tuple[Alternative, list[SliceDevice]]],
        taken: dict[tuple[tuple[str, str, str], str], Fraction],
    ) -> dict[tuple[tuple[str, str, str], str], Fraction] | None:
        used = {d.key for _, devices in chosen for d in devices}
        extra: dict[tuple[tuple[str, str, str], str], Fraction] = {}
        for device, check in combo:
            if not device.allow_multiple and device.key in used:
                self._reject(f"{device.name} is already taken by another request of this claim")
                return None
            for key, amount in check.takes:
                slot = (device.key, key)
                cap = device.capacity[key]
                held = held_amount(device, self.usage.get(device.key, Usage()), key)
                if held + taken.get(slot, Fraction(0)) + extra.get(slot, Fraction(0)) + amount > cap.value:
                    self._reject(f"{device.name}: {key} does not cover all the requests of this claim together")
                    return None
                extra[slot] = extra.get(slot, Fraction(0)) + amount
        placed = [*chosen, (alt, [d for d, _ in combo])]
        for constraint in self.claim.constraints:
            values = [
                d.attributes.get(constraint.attribute) for a, ds in placed if constraint.covers(a.name) for d in ds
            ]
            if any(v is None for v in values):
                self._reject(f"{constraint}: a device lacks the attribute")
                return None
            ok = len(set(map(repr, values))) == len(values) if constraint.distinct else len(set(map(repr, values))) <= 1
            if not ok:
                self._reject(str(constraint))
                return None
        return extra

    def _reject(self, why: str) -> None:
        self.rejections[why] = self.rejections.get(why, 0) + 1


def _labels(devices: Sequence[SliceDevice]) -> dict[tuple[str, str, str], str]:
    """Device names as people know them; `pool/device` once the slices hold more than one pool."""
    pools = {(d.driver, d.pool) for d in devices}
    return {d.key: d.name if len(pools) == 1 else f"{d.pool}/{d.name}" for d in devices}


def explain(
    claim: Claim,
    classes: Mapping[str, DeviceClass],
    devices: Sequence[SliceDevice],
    usage: Mapping[tuple[str, str, str], Usage],
) -> Explanation:
    labels = _labels(devices)
    results: list[RequestResult] = []
    checked: dict[str, list[tuple[SliceDevice, DeviceCheck]]] = {}
    for request in claim.requests:
        alternatives = []
        for alt in request.alternatives:
            dclass = classes.get(alt.class_name)
            if dclass is None:
                known = ", ".join(sorted(classes)) or "none given"
                alternatives.append(AlternativeResult(alt, (), f"DeviceClass {alt.class_name!r} not found ({known})"))
                checked[alt.name] = []
                continue
            pairs = [(d, check_device(alt, dclass, d, usage.get(d.key, Usage()), labels[d.key])) for d in devices]
            checked[alt.name] = pairs
            alternatives.append(AlternativeResult(alt, tuple(c for _, c in pairs), _shortfall(alt, pairs)))
        results.append(RequestResult(request, tuple(alternatives)))
    errors = [c for pairs in checked.values() for _, c in pairs if c.cel_error]
    if errors:
        first = errors[0]
        reason = f"a CEL runtime error stops the scheduler from allocating this claim: {first.device}: {first.reason}"
        return Explanation(claim.name, False, None, tuple(results), reason)
    return _allocate(claim, results, checked, devices, usage, labels)


def _shortfall(alt: Alternative, pairs: list[tuple[SliceDevice, DeviceCheck]]) -> str:
    fitting = sum(1 for _, c in pairs if c.fits)
    if alt.all_devices:
        matching = [c for _, c in pairs if c.fits or not c.reason.startswith(("DeviceClass ", "request "))]
        busy = [c for c in matching if not c.fits]
        if not matching:
            return "allocationMode All: no device matches the selectors"
        if busy:
            return f"allocationMode All: {busy[0].device} matches but is not available ({busy[0].reason})"
        return ""
    if fitting < alt.count:
        return f"needs {alt.count} device(s); {fitting} pass the selectors and capacity checks"
    return ""


def _allocate(
    claim: Claim,
    results: list[RequestResult],
    checked: Mapping[str, list[tuple[SliceDevice, DeviceCheck]]],
    devices: Sequence[SliceDevice],
    usage: Mapping[tuple[str, str, str], Usage],
    labels: Mapping[tuple[str, str, str], str],
) -> Explanation:
    nodes: list[str | None] = [*sorted({d.node for d in devices if d.node is not None})] or [None]
    problems: list[str] = []
    gave_up = False
    rejections: dict[str, int] = {}
    for node in nodes:
        here = {d.key for d in devices if d.node in (node, None)}
        options = [
            [
                (alt, [(d, c) for d, c in checked[alt.name] if c.fits and d.key in here])
                for alt in request.alternatives
                if not _node_problem(alt, [(d, c) for d, c in checked[alt.name] if d.key in here])
            ]
            for request in claim.requests
        ]
        empty = [r.name for r, opts in zip(claim.requests, options, strict=True) if not opts]
        if empty:
            problems.append(f"{'node ' + node if node else 'the slices'}: request(s) {', '.join(empty)} cannot be met")
            continue
        search = _Search(claim, options, usage)
        found = search.run()
        if found is not None:
            chosen = {alt.name: [labels[d.key] for d in ds] for alt, ds in found}
            final = []
            for result in results:
                name = next(a.name for a in result.request.alternatives if a.name in chosen)
                final.append(RequestResult(result.request, result.alternatives, name, tuple(chosen[name])))
            return Explanation(claim.name, True, node, tuple(final))
        gave_up = gave_up or search.steps > SEARCH_STEPS
        for why, n in search.rejections.items():
            rejections[why] = rejections.get(why, 0) + n
    if gave_up:
        reason = f"undecided: no allocation found within {SEARCH_STEPS} combinations"
    elif rejections:
        reason = (
            "no combination of candidates fits together: "
            + "; ".join(sorted(rejections, key=lambda w: -rejections[w])[:3])
            + _constraint_values(claim, checked)
        )
    else:
        reason = _request_problems(results) or "; ".join(problems)
    return Explanation(claim.name, False, None, tuple(results), reason)


def _node_problem(alt: Alternative, pairs: list[tuple[SliceDevice, DeviceCheck]]) -> str:
    return _shortfall(alt, pairs) if pairs else "no devices"


def _request_problems(results: list[RequestResult]) -> str:
    texts = []
    for result in results:
        problems = [f"{a.alternative.name}: {a.problem}" for a in result.alternatives if a.problem]
        if len(problems) == len(result.alternatives):
            texts.append("; ".join(problems))
    return "; ".join(texts)


def _constraint_values(claim: Claim, checked: Mapping[str, list[tuple[SliceDevice, DeviceCheck]]]) -> str:
    """The attribute values the candidates offer, per constrained request: what the constraint had to choose from."""
    parts = []
    for constraint in claim.constraints:
        offers = []
        for name, pairs in checked.items():
            if constraint.covers(name):
                values = sorted({str(d.attributes.get(constraint.attribute, "missing")) for d, c in pairs if c.fits})
                offers.append(f"{name} offers {', '.join(values) or 'nothing'}")
        parts.append(f"{constraint.attribute}: {'; '.join(offers)}")
    return f" ({' | '.join(parts)})" if parts else ""


# ----------------------------------------------------------------------------------------------------------------
# Text for people.


def render_table(explanation: Explanation) -> str:
    verdict = f"satisfiable on node {explanation.node}" if explanation.satisfiable else "NOT satisfiable"
    if explanation.satisfiable and explanation.node is None:
        verdict = "satisfiable"
    lines = [f"{explanation.claim}: {verdict}"]
    if explanation.reason:
        lines.append(f"  why: {explanation.reason}")
    for result in explanation.requests:
        for alt in result.alternatives:
            a = alt.alternative
            mode = "All" if a.all_devices else f"ExactCount {a.count}"
            wants = ", ".join(f"{k}={number(v)}" for k, v in a.capacity)
            lines.append(
                f"  request {a.name}: DeviceClass {a.class_name}, {mode}" + (f", capacity {wants}" if wants else "")
            )
            if alt.problem:
                lines.append(f"    ! {alt.problem}")
            width = max((len(c.device) for c in alt.checks), default=0)
            for check in alt.checks:
                mark = "fits" if check.fits else "no  "
                lines.append(f"    {check.device:<{width}}  {mark}  {check.reason}".rstrip())
        if result.chosen:
            lines.append(f"  => {result.chosen}: {', '.join(result.devices)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The shell: files or the API server in, text out.


def load_objects(path: Path) -> list[dict[str, Any]]:
    """Every object in a YAML stream or JSON file (v1 Lists unpacked), or in the *.yaml/*.yml/*.json of a folder."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        return [obj for p in files for obj in load_objects(p)]
    docs = read_yaml(path, "file", ExplainInputError)
    objects: list[dict[str, Any]] = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ExplainInputError(f"{path}: holds {type(doc).__name__} {doc!r}, not a Kubernetes object")
        if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            objects.extend(item for item in doc["items"] if isinstance(item, dict))
        else:
            objects.append(doc)
    return objects


def _of_kind(objects: Iterable[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") in kinds]


def pick_claim(objects: list[dict[str, Any]], source: str, name: str | None) -> dict[str, Any]:
    claims = _of_kind(objects, "ResourceClaim", "ResourceClaimTemplate")
    if name is not None:
        claims = [c for c in claims if (c.get("metadata") or {}).get("name") == name]
    if len(claims) != 1:
        found = ", ".join(_describe(c) for c in claims) or "none"
        hint = " (pick one with --claim-name)" if len(claims) > 1 else ""
        wanted = f" named {name!r}" if name else ""
        raise ExplainInputError(
            f"--claim {source}: expected one ResourceClaim or ResourceClaimTemplate{wanted}, found {found}{hint}"
        )
    return claims[0]


def add_explain_parser(subparsers: Any) -> None:
    explain_parser = subparsers.add_parser(
        "explain",
        help="why a ResourceClaim fits a node or stays Pending: selectors, capacity, constraints",
        description="Exit code 0: satisfiable; 1: not satisfiable; 2: bad input (including CEL syntax/type errors).",
    )
    explain_parser.add_argument(
        "--claim", required=True, metavar="FILE", help="a ResourceClaim or ResourceClaimTemplate"
    )
    explain_parser.add_argument("--claim-name", metavar="NAME", help="which claim, when FILE holds several")
    explain_parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="FILE",
        help="DeviceClass file or folder (repeatable)",
    )
    source = explain_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--slices", metavar="FILE|DIR", help="ResourceSlices (e.g. from dra-cpu slices)")
    source.add_argument("--kubeconfig", metavar="FILE", help="read slices, classes and claims in use from the cluster")
    explain_parser.add_argument(
        "--claims-in-use", metavar="FILE|DIR", help="allocated ResourceClaims that hold devices"
    )
    explain_parser.add_argument("--output", "-o", choices=["table", "json"], default="table")
    explain_parser.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    claim_path = Path(args.claim)
    claim_obj = pick_claim(load_objects(claim_path), str(claim_path), args.claim_name)
    claim = parse_claim(claim_obj, str(claim_path))
    class_objs: list[tuple[str, dict[str, Any]]] = []
    slice_objs: list[dict[str, Any]]
    in_use: list[dict[str, Any]] = []
    slices_source = args.slices or args.kubeconfig
    if args.kubeconfig:
        from dra_cpu.status import read_cluster

        cluster = read_cluster(args.kubeconfig)
        slice_objs = cluster.slices
        class_objs = [(f"cluster {_describe(o)}", o) for o in cluster.classes]
        in_use = cluster.claims
    else:
        slice_objs = _of_kind(load_objects(Path(args.slices)), "ResourceSlice")
    for path in args.classes:
        class_objs += [(path, o) for o in _of_kind(load_objects(Path(path)), "DeviceClass")]
    if args.claims_in_use:
        in_use = _of_kind(load_objects(Path(args.claims_in_use)), "ResourceClaim")
    classes = {c.name: c for c in (parse_class(o, source) for source, o in class_objs)}
    devices = parse_slices(slice_objs, slices_source)
    usage = parse_usage(in_use, args.claims_in_use or str(slices_source), skip=claim.name)
    result = explain(claim, classes, devices, usage)
    if args.output == "json":
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(render_table(result), end="")
    return 0 if result.satisfiable else EXIT_UNSATISFIABLE
