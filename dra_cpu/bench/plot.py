"""PNG heatmaps of the NUMA matrix and CDFs of the isolation cases. matplotlib comes with the `bench` extra and is
imported only here, when a plot is asked for, so the rest of dra-cpu does not need it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dra_cpu.bench.extra import MissingExtraError
from dra_cpu.bench.report import METRIC_TITLES, METRICS, IsolationReport, NumaReport


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("matplotlib") from None
    matplotlib.use("Agg")  # files only: no display on a node or in a pod
    import matplotlib.pyplot as plt

    return plt


def numa_heatmaps(report: NumaReport, directory: Path) -> list[Path]:
    """One heatmap per metric (CPU node rows, memory node columns); invalid pairs are left blank and marked."""
    plt = _pyplot()
    paths = []
    for metric in METRICS:
        cpu_nodes, memory_nodes = report.cpu_nodes, report.memory_nodes
        grid = [[_figure(report, c, m, metric) for m in memory_nodes] for c in cpu_nodes]
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(memory_nodes), 1.2 + 1.0 * len(cpu_nodes)))
        values = [[float("nan") if v is None else v for v in row] for row in grid]
        image = ax.imshow(values, cmap="viridis_r" if metric == "latency" else "viridis")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                text = "invalid" if value is None else f"{value:.1f}"
                ax.text(j, i, text, ha="center", va="center", color="white" if value is not None else "red")
        ax.set_xticks(range(len(memory_nodes)), [f"mem {m}" for m in memory_nodes])
        ax.set_yticks(range(len(cpu_nodes)), [f"cpu {c}" for c in cpu_nodes])
        ax.set_title(METRIC_TITLES[metric].split(" (")[0], fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        paths.append(_save(plt, fig, directory / f"numa-{metric}.png"))
    return paths


def _figure(report: NumaReport, cpu_node: int, memory_node: int, metric: str) -> float | None:
    result = report.result(cpu_node, memory_node)
    return result.figure(metric) if result else None


def isolation_cdfs(report: IsolationReport, directory: Path) -> list[Path]:
    """Empirical CDFs on a log time axis, one plot per kernel, one line per case: tails show at the top right."""
    plt = _pyplot()
    paths = []
    for kernel, samples_of in (("wakeup", "wakeup_ns"), ("compute", "compute_ns")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for case in report.cases:
            samples = sorted(s / 1000 for s in getattr(case, samples_of))
            fractions = [(k + 1) / len(samples) for k in range(len(samples))]
            ax.step(samples, fractions, where="post", label=case.name)
        ax.set_xscale("log")
        ax.set_xlabel("late by, us" if kernel == "wakeup" else "duration, us")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{kernel}: alone vs shared vs exclusive CPUs", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(_save(plt, fig, directory / f"isolation-{kernel}-cdf.png"))
    return paths


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
