"""What `explain` found: per device, per request alternative, per request and for the claim. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from dra_cpu.tools.explain.model import Alternative, Request, number


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
