"""The cluster's DRA objects for `status` and `explain --kubeconfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dra_cpu.kube.apiserver import DraObjects


def read_cluster(kubeconfig: str | None) -> DraObjects:
    # Only commands that talk to a cluster import the API client.
    from dra_cpu.kube.apiserver import connect

    api = connect(kubeconfig)
    try:
        return api.list_dra_objects()
    finally:
        api.close()
