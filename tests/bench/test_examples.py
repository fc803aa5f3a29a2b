"""hack/examples/numa-bench: valid Kubernetes 1.37 objects, and the claims really ask for what the guide says."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.harness.paths import EXAMPLES

EXAMPLES = EXAMPLES / "numa-bench"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


@pytest.mark.parametrize("name", ["claims.yaml", "pods.yaml"])
def test_examples_validate_strictly(name: str) -> None:
    for doc in documents(name):
        kubernetes_validate.validate(doc, "1.37", strict=True)


def nodes_by_request(claim: dict[str, Any]) -> dict[str, str]:
    out = {}
    for request in claim["spec"]["devices"]["requests"]:
        (selector,) = request["exactly"]["selectors"]
        out[request["exactly"]["deviceClassName"]] = selector["cel"]["expression"].split("==")[1].strip()
    return out


def test_aligned_claim_keeps_cpus_and_hugepages_on_one_node_and_misaligned_does_not() -> None:
    claims = {c["metadata"]["name"]: c for c in documents("claims.yaml")}
    assert nodes_by_request(claims["numa-bench-aligned"]) == {"dra.cpu": "0", "dra.hugepages-2mi": "0"}
    assert nodes_by_request(claims["numa-bench-misaligned"]) == {"dra.cpu": "0", "dra.hugepages-2mi": "1"}
    for claim in claims.values():
        amounts = {
            r["exactly"]["deviceClassName"]: r["exactly"]["capacity"]["requests"]
            for r in claim["spec"]["devices"]["requests"]
        }
        assert amounts == {"dra.cpu": {"dra.cpu/cpu": "4"}, "dra.hugepages-2mi": {"dra.cpu/memory": "3Gi"}}


def test_each_pod_uses_its_claim_and_runs_the_hugepage_bench() -> None:
    for pod in documents("pods.yaml"):
        (claim,) = pod["spec"]["resourceClaims"]
        assert claim["resourceClaimName"] == pod["metadata"]["name"]
        (container,) = pod["spec"]["containers"]
        assert "dra-cpu bench numa --hugepages" in container["command"][-1]
        # 3 arrays of --size 1G must fit the 3Gi of hugepages the claim gives.
        assert container["resources"]["limits"]["hugepages-2Mi"] == "3Gi"
