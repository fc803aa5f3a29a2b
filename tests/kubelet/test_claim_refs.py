"""Claim references enter through the kubelet socket and become CDI file and device names: anything but a UUID uid,
a DNS-label namespace and a DNS-subdomain name is refused per claim, naming the value; an unprepare of such a
reference, which nothing could have prepared, answers success instead of failing forever."""

from __future__ import annotations

from typing import Any

import pytest

from dra_cpu.core.claims import ClaimRef, ref_problem
from tests.harness.claims import result

UID = "4f6c1a2e-9b1d-4c5e-8f00-0123456789ab"


@pytest.mark.parametrize(
    ("namespace", "name", "uid", "message"),
    [
        ("default", "c", "uid\nX", "uid 'uid\\nX' is not a UUID"),
        ("default", "c", "../../etc/passwd", "uid '../../etc/passwd' is not a UUID"),
        ("default", "c", "a/b", "uid 'a/b' is not a UUID"),
        ("default", "c", "a=b", "uid 'a=b' is not a UUID"),
        ("default", "c", UID + "\n", "is not a UUID"),
        ("default", "c", "x" * 300, "(300 characters) is not a UUID"),
        ("Default", "c", UID, "namespace 'Default' is not a DNS label"),
        ("a" * 64, "c", UID, "is not a DNS label"),
        ("default", "c/../d", UID, "name 'c/../d' is not a DNS subdomain"),
        ("default", "a" * 254, UID, "is not a DNS subdomain"),
        ("default", "", UID, "empty name"),
    ],
)
def test_a_bad_reference_is_named(namespace: str, name: str, uid: str, message: str) -> None:
    assert message in ref_problem(namespace, name, uid)


def test_good_references_pass() -> None:
    assert ref_problem("kube-system", "my-claim.v1", UID) == ""
    assert ref_problem("default", "a" * 253, UID.upper()) == ""


def test_bad_uids_are_refused_per_claim_and_never_reach_the_disk(node_factory: Any) -> None:
    node = node_factory()
    good = node.claim([result("cpu-numa0", cpus=1)])
    bad = [ClaimRef("default", "c", uid) for uid in ("..", "a/b", "x=1", "u\n", "y" * 300)]
    response = node.kubelet.prepare([good, *bad])
    assert response.claims[good.uid].error == ""
    for ref in bad:
        assert "is not a UUID" in response.claims[ref.uid].error
    assert sorted(p.name for p in node.driver.reconciler.cdi.root.iterdir()) == [
        node.driver.reconciler.cdi.path(good.uid).name,
        f"dra.cpu_metadata_{good.uid}_cpus.json",
    ]


def test_unprepare_of_a_never_prepared_over_long_uid_answers_success(node_factory: Any) -> None:
    node = node_factory()
    ref = ClaimRef("default", "c", "z" * 1000)
    for _ in range(2):
        assert node.kubelet.unprepare([ref]).claims[ref.uid].error == ""
