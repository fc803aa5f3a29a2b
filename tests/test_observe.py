"""The operation metrics count each result under our names and the upstream driver's, both results from the start."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from dra_cpu.observe import OperationMetrics


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    lines = generate_latest(registry).decode().splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def test_each_result_is_counted_under_both_names_and_shows_at_zero_before_any_call() -> None:
    registry = CollectorRegistry()
    metrics = OperationMetrics(registry)
    names = [
        f"{metric}{{result={result}}}"
        for metric in ("dra_cpu_prepare_total", "dra_cpu_prepare_claims_total", "dra_cpu_unprepare_total")
        for result in ('"success"', '"error"')
    ]
    assert [_samples(registry)[name] for name in names] == [0.0] * 6

    metrics.record_prepare(True, 0.002)
    metrics.record_prepare(True, 0.003)
    metrics.record_prepare(False, 0.5)
    metrics.record_unprepare(True)
    samples = _samples(registry)
    assert [samples[name] for name in names] == [2.0, 1.0, 2.0, 1.0, 1.0, 0.0]
    assert samples['dra_cpu_unprepare_claims_total{result="success"}'] == 1.0
    assert samples["dra_cpu_prepare_duration_seconds_count"] == 3.0
    assert samples['dra_cpu_prepare_claim_duration_seconds_bucket{le="0.005"}'] == 2.0
