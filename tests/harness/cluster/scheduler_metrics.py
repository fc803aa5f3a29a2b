"""The kube-scheduler's own timings, from its Prometheus /metrics text: the histograms the scheduler benchmarks
(hack/bench/scheduler.py, hack/bench/scale.py) read before and after their pods, and subtract."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Histogram:
    """A Prometheus histogram, or the difference of two readings: sum and count, and cumulative counts by bound."""

    sum: float = 0.0
    count: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    def add(self, other: Histogram, sign: float = 1.0) -> None:
        self.sum += sign * other.sum
        self.count += sign * other.count
        for bound, count in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + sign * count

    def mean_ms(self) -> float | None:
        return self.sum / self.count * 1000 if self.count else None

    def quantile_ms(self, q: float) -> float | None:
        """Interpolated within the bucket it falls in, as PromQL's histogram_quantile does."""
        if not self.count:
            return None
        rank, below, lower = q * self.count, 0.0, 0.0
        for bound in sorted(self.buckets):
            if self.buckets[bound] >= rank:
                if bound == float("inf"):
                    return lower * 1000
                share = (rank - below) / (self.buckets[bound] - below) if self.buckets[bound] > below else 1.0
                return (lower + (bound - lower) * share) * 1000
            below, lower = self.buckets[bound], bound
        return lower * 1000


# name -> (metric family, labels a sample must have)
METRICS: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "attempt": ("scheduler_scheduling_attempt_duration_seconds", {"result": "scheduled"}),
    "algorithm": ("scheduler_scheduling_algorithm_duration_seconds", {}),
    "filter": ("scheduler_framework_extension_point_duration_seconds", {"extension_point": "Filter"}),
    "dra_filter": (
        "scheduler_plugin_execution_duration_seconds",
        {"plugin": "DynamicResources", "extension_point": "Filter"},
    ),
}


def scrape(text: str) -> dict[str, Histogram]:
    """METRICS from a scheduler's /metrics text, each summed over the series whose labels match."""
    found = {name: Histogram() for name in METRICS}
    for family in text_string_to_metric_families(text):
        for name, (wanted, labels) in METRICS.items():
            if family.name != wanted:
                continue
            for sample in family.samples:
                if not all(sample.labels.get(k) == v for k, v in labels.items()):
                    continue
                reading = Histogram()
                if sample.name.endswith("_sum"):
                    reading.sum = sample.value
                elif sample.name.endswith("_count"):
                    reading.count = sample.value
                elif sample.name.endswith("_bucket"):
                    reading.buckets[float(sample.labels["le"])] = sample.value
                found[name].add(reading)
    return found


def difference(after: Mapping[str, Histogram], before: Mapping[str, Histogram]) -> dict[str, Histogram]:
    """What happened between two scrapes."""
    found = {}
    for name in METRICS:
        found[name] = Histogram()
        found[name].add(after[name])
        found[name].add(before[name], -1.0)
    return found
