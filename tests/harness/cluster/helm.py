"""helm v4 (hack/testenv/helm.sh) and the project's chart, charts/dra-cpu: rendering and linting it, and running helm
against a cluster (tests/harness/cluster/chart.py installs the driver with it)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.harness.component import Unavailable
from tests.harness.paths import REPO, TESTENV
from tests.harness.typed import as_dict

SCRIPT = TESTENV / "helm.sh"
CHART = REPO / "charts" / "dra-cpu"


@dataclass(frozen=True)
class Helm:
    binary: Path

    @classmethod
    def installed(cls) -> Helm:
        """The helm hack/testenv/helm.sh installed; Unavailable when it was not run."""
        found = subprocess.run(["bash", str(SCRIPT), "path"], capture_output=True, text=True, check=False)
        if found.returncode != 0:
            raise Unavailable("helm is not installed: run hack/testenv/helm.sh install")
        return cls(Path(found.stdout.strip()))

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=timeout, check=False)

    def template(self, *options: str, chart: Path = CHART, namespace: str = "kube-system") -> list[dict[str, Any]]:
        """`helm template` of the chart with OPTIONS (e.g. --set k=v), as the list of rendered objects."""
        result = self.run("template", "dra-cpu", str(chart), "--namespace", namespace, *options)
        if result.returncode != 0:
            raise AssertionError(f"helm template {' '.join(options)} failed:\n{result.stderr}")
        return [as_dict(doc, "a rendered object") for doc in yaml.safe_load_all(result.stdout) if doc]

    def lint(self, options: Sequence[str] = (), chart: Path = CHART) -> subprocess.CompletedProcess[str]:
        return self.run("lint", "--strict", str(chart), *options)
