"""The driver's CDI spec consumed by a real runtime: podman injects the claim's variables into the container."""

from __future__ import annotations

import json

from tests.support.kubelet_node import NodeFactory, result
from tests.support.testenv_podman import Podman


def test_podman_injects_the_claims_env(node_factory: NodeFactory, podman: Podman) -> None:
    node = node_factory("kvm-2cpu")
    ref = node.claim([result("cpu-numa0", cpus=1)])
    response = node.prepare(ref)
    assert not response.error
    spec = json.loads(node.driver.cdi_store.path(ref.uid).read_text())
    podman.write_cdi_spec(spec)
    [cdi_id] = response.devices[0].cdi_device_ids
    out = podman.run(["env"], devices=[cdi_id]).stdout
    cpus = node.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"]
    assert f"DRA_CPUSET_{ref.uid}={cpus}" in out.splitlines()
    assert f"DRA_MEMS_{ref.uid}=0" in out.splitlines()
