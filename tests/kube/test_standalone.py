"""The standalone folder stands in for the API server: a claim file that is not UTF-8 or holds a number YAML cannot
build is a ClusterError naming the file (the claim's prepare fails with it), not an exception in the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from dra_cpu.kube.api import ClusterError
from dra_cpu.kube.standalone import StandaloneAPI


@pytest.mark.parametrize("content", [b"metadata: {name: \xe9}\n", b"spec: " + b"1" * 5000 + b"\n"])
def test_an_unreadable_claim_file_is_a_cluster_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "resourceclaims" / "default" / "c.yaml"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ClusterError, match=f"cannot read {path}: ") as err:
        StandaloneAPI(tmp_path).get_claim("default", "c")
    assert len(str(err.value)) < 500
