"""The cluster's DRA objects for `status` and `explain --kubeconfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dra_cpu.kube.apiserver import DraObjects


def read_cluster(kubeconfig: str | None) -> DraObjects:
    # The kubernetes client takes about a second to import: only commands that talk to a cluster pay for it.
    from dra_cpu.kube.apiserver import connect

    api = connect(kubeconfig)
    try:
        return api.list_dra_objects()
    finally:
        api.close()
