"""API objects (dicts in the server's JSON shape) -> the model, every error naming the source, field and value.
Pure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from typing import Any

from dra_cpu.core.objects import At
from dra_cpu.errors import shown
from dra_cpu.tools.cel.library import AttributeValue, ScalarValue, Semver
from dra_cpu.tools.cel.selector import Selector, compile_selector
from dra_cpu.tools.explain.model import (
    Alternative,
    Capacity,
    Claim,
    Constraint,
    DeviceClass,
    ExplainInputError,
    Held,
    Request,
    SliceDevice,
    Taint,
    Toleration,
    Usage,
)

# Kind, a DNS-label namespace and a DNS-subdomain name fit; a megabyte of name from a file does not.
_MAX_DESCRIPTION = 330


def _at(source: str, path: str = "") -> At:
    return At(source, path, ExplainInputError)


def qualified(key: str, driver: str) -> str:
    """Attribute and capacity names without a domain are in the driver's own domain."""
    return key if "/" in key else f"{driver}/{key}"


def describe(obj: Mapping[str, Any]) -> str:
    """`Kind namespace/name`, whatever types a file gave those fields, cut to a length that fits a message."""
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "?") if isinstance(metadata, Mapping) else "?"
    namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
    text = f"{obj.get('kind', 'object')} {f'{namespace}/' if namespace else ''}{name}"
    return text if len(text) <= _MAX_DESCRIPTION else text[: _MAX_DESCRIPTION - 3] + "..."


def parse_class(obj: Mapping[str, Any], source: str) -> DeviceClass:
    at = _at(source)
    name = (at / "metadata" / "name").string(at.mapping(obj.get("metadata")).get("name"))
    spec = (at / "spec").mapping(obj.get("spec"))
    return DeviceClass(name, _selectors(at / "spec" / "selectors", spec.get("selectors"), f"DeviceClass {name}"))


def _selectors(at: At, value: Any, owner: str) -> tuple[Selector, ...]:
    selectors = []
    for item_at, item in at.items(value):
        cel = (item_at / "cel").mapping(item_at.mapping(item, optional=False).get("cel"), optional=False)
        expression = (item_at / "cel" / "expression").string(cel.get("expression"))
        selectors.append(compile_selector(expression, f"{owner} {item_at.path.rsplit('.', 1)[-1]}"))
    return tuple(selectors)


def parse_claim(obj: Mapping[str, Any], source: str) -> Claim:
    """A ResourceClaim, or a ResourceClaimTemplate (its spec.spec)."""
    at = _at(source)
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
    return Claim(describe(obj), requests, tuple(constraints))


def _request(at: At, raw: Any) -> Request:
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


def _subs(at: At, value: Any) -> Iterator[tuple[At, Mapping[str, Any]]]:
    for s_at, s in (at / "firstAvailable").items(value):
        yield s_at, s_at.mapping(s, optional=False)


def _alternative(at: At, raw: Any, name: str) -> Alternative:
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
    amounts = tuple((str(k), _positive(at / "capacity" / "requests" / str(k), v)) for k, v in requests.items())
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


def _positive(at: At, value: Any) -> Fraction:
    """A capacity request: Kubernetes' validation refuses zero and negative amounts."""
    amount = at.quantity(value)
    if amount <= 0:
        raise at.fail(f"must be a positive quantity, not {shown(value)}")
    return amount


def parse_slices(objs: Iterable[Mapping[str, Any]], source: str) -> tuple[SliceDevice, ...]:
    """Devices of the newest generation of each pool, in slice order (the scheduler ignores older generations)."""
    slices = []
    for index, obj in enumerate(objs):
        at = _at(f"{source}: {describe(obj)}", "spec")
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


def _device(at: At, raw: Any, driver: str, pool: str, node: str | None) -> SliceDevice:
    item = at.mapping(raw, optional=False)
    name = (at / "name").string(item.get("name"))
    attributes: dict[str, AttributeValue] = {}
    for key, value in (at / "attributes").mapping(item.get("attributes")).items():
        attributes[qualified(str(key), driver)] = _attribute(at / "attributes" / str(key), value)
    capacity = {
        qualified(str(key), driver): _capacity(at / "capacity" / str(key), value)
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


_SCALARS = ("bool", "int", "string", "version")


def _attribute(at: At, raw: Any) -> AttributeValue:
    """Exactly one of bool, int, string, version, or (KEP-5491) a non-empty list: bools, ints, strings, versions."""
    value = at.mapping(raw, optional=False)
    kinds = [k for k in _SCALARS if k in value] + [f"{k}s" for k in _SCALARS if f"{k}s" in value]
    if len(kinds) != 1:
        names = ", ".join(_SCALARS) + " or a list of one of them (bools, ints, strings, versions)"
        raise at.fail(f"must hold exactly one of {names}, not {dict(value)!r}")
    kind = kinds[0]
    if kind.endswith("s"):
        items = value[kind]
        if not isinstance(items, list) or not items:
            raise (at / kind).fail(f"must be a non-empty list, not {items!r}")
        return tuple(_scalar(at / kind / i, kind[:-1], item) for i, item in enumerate(items))
    return _scalar(at / kind, kind, value[kind])


def _scalar(at: At, kind: str, raw: Any) -> ScalarValue:
    if kind == "bool" and isinstance(raw, bool):
        return raw
    if kind == "int" and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if kind == "string" and isinstance(raw, str):
        return raw
    if kind == "version" and isinstance(raw, str):
        try:
            return Semver.parse(raw)
        except ValueError:
            raise at.fail(f"must be a semver, not {raw!r}") from None
    raise at.fail(f"must be a {kind}, not {raw!r}")


def _capacity(at: At, raw: Any) -> Capacity:
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
        name = describe(obj)
        if name == skip:
            continue
        at = _at(f"{source}: {name}", "status.allocation.devices.results")
        status = _at(at.source, "status").mapping(obj.get("status"))
        allocation = _at(at.source, "status.allocation").mapping(status.get("allocation"))
        devices = _at(at.source, "status.allocation.devices").mapping(allocation.get("devices"))
        for r_at, raw in at.items(devices.get("results")):
            result = r_at.mapping(raw, optional=False)
            driver = (r_at / "driver").string(result.get("driver"))
            key = (driver, (r_at / "pool").string(result.get("pool")), (r_at / "device").string(result.get("device")))
            consumed_at = r_at / "consumedCapacity"
            consumed = tuple(
                (qualified(str(k), driver), (consumed_at / str(k)).quantity(v))
                for k, v in consumed_at.mapping(result.get("consumedCapacity")).items()
            )
            held.setdefault(key, []).append(Held(name.split(" ", 1)[-1], consumed))
    return {key: Usage(tuple(entries)) for key, entries in held.items()}
