"""The search: a claim against DeviceClasses, devices and what allocated claims hold, on one node, as the
scheduler's structured allocator does it. Pure.

Constraints compare attributes as the 1.37 allocator does with DRAListTypeAttributes on (k8s.io/dynamic-resource-
allocation structured/internal/experimental): every value is a set, a scalar a set of one, and values of different
kinds (int, bool, string, version) never meet. matchAttribute needs an element common to every device's set (for
scalars: one value); distinctAttribute needs the sets pairwise disjoint (for scalars: all different).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from dra_cpu.tools.cel.library import AttributeValue, Semver
from dra_cpu.tools.explain.model import (
    Alternative,
    Claim,
    DeviceClass,
    SliceDevice,
    Usage,
    held_amount,
    number,
)
from dra_cpu.tools.explain.parse import qualified
from dra_cpu.tools.explain.result import AlternativeResult, DeviceCheck, Explanation, RequestResult

# Enough for every claim a person writes; a claim that needs more is reported as undecided, not as unsatisfiable.
SEARCH_STEPS = 200_000


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
    requested = {qualified(k, device.driver): v for k, v in alt.capacity}
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
        # The device's total, what claims hold of it and what is free: per NUMA node for memory and pages.
        by = f" ({', '.join(usage.holders)} hold {number(held)})" if held else ""
        if amount > free:
            return DeviceCheck(label, False, f"{key}: {how}, only {number(free)} of {number(cap.value)} free{by}")
        takes.append((key, amount))
        notes.append(f"{key}: {how}, {number(free)} of {number(cap.value)} free{by}")
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
            present = [v for v in values if v is not None]
            if len(present) < len(values):
                self._reject(f"{constraint}: a device lacks the attribute")
                return None
            ok = distinct(present) if constraint.distinct else match(present)
            if not ok:
                self._reject(str(constraint))
                return None
        return extra

    def _reject(self, why: str) -> None:
        self.rejections[why] = self.rejections.get(why, 0) + 1


def as_set(value: AttributeValue) -> tuple[str, frozenset[object]]:
    """An attribute as the allocator compares it: its kind and its elements (a scalar is a set of one). Versions
    compare as their text, as the allocator compares them (semver's minimal form makes that exact)."""
    items = value if isinstance(value, tuple) else (value,)
    kind = type(items[0]).__name__
    return kind, frozenset(str(i) if isinstance(i, Semver) else i for i in items)


def match(values: Sequence[AttributeValue]) -> bool:
    """matchAttribute: one kind, and an element every device has."""
    sets = [as_set(v) for v in values]
    if len({kind for kind, _ in sets}) > 1:
        return False
    return not sets or bool(frozenset.intersection(*(items for _, items in sets)))


def distinct(values: Sequence[AttributeValue]) -> bool:
    """distinctAttribute: no two devices share an element (values of different kinds never do)."""
    sets = [as_set(v) for v in values]
    return all(a[0] != b[0] or not a[1] & b[1] for a, b in itertools.combinations(sets, 2))


def show_value(value: AttributeValue) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


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
                values = sorted(
                    {show_value(d.attributes.get(constraint.attribute, "missing")) for d, c in pairs if c.fits}
                )
                offers.append(f"{name} offers {', '.join(values) or 'nothing'}")
        parts.append(f"{constraint.attribute}: {'; '.join(offers)}")
    return f" ({' | '.join(parts)})" if parts else ""
