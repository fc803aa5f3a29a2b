"""pytest plugin: helm v4 (hack/testenv/helm.sh), for rendering and linting charts/dra-cpu.

Fixture `helm` gives a `Helm` whose `template`/`lint` run the real binary; it skips when helm is not installed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.paths import REPO, TESTENV
from tests.harness.typed import as_dict

SCRIPT = TESTENV / "helm.sh"
CHART = REPO / "charts" / "dra-cpu"


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=60, check=False)

    def template(self, *options: str, chart: Path = CHART, namespace: str = "kube-system") -> list[dict[str, Any]]:
        """`helm template` of the chart with OPTIONS (e.g. --set k=v), as the list of rendered objects."""
        result = self.run("template", "dra-cpu", str(chart), "--namespace", namespace, *options)
        if result.returncode != 0:
            raise AssertionError(f"helm template {' '.join(options)} failed:\n{result.stderr}")
        return [as_dict(doc, "a rendered object") for doc in yaml.safe_load_all(result.stdout) if doc]

    def lint(self, options: Sequence[str] = (), chart: Path = CHART) -> subprocess.CompletedProcess[str]:
        return self.run("lint", "--strict", str(chart), *options)


@pytest.fixture(scope="session")
def helm() -> Helm:
    found = subprocess.run(["bash", str(SCRIPT), "path"], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        pytest.skip("helm is not installed: run hack/testenv/helm.sh install")
    return Helm(Path(found.stdout.strip()))
