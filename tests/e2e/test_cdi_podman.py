"""The driver's CDI specs consumed by a real runtime: podman injects the claim's variables into the container, and
mounts its device metadata file."""

from __future__ import annotations

import json

from dra_cpu.core.device_metadata import CONTAINER_DIR
from dra_cpu.store.metadata_files import decode
from tests.harness.claims import result
from tests.harness.nodes.standin import NodeFactory
from tests.harness.runtimes.podman import Podman


def test_podman_injects_the_claims_env(node_factory: NodeFactory, podman: Podman) -> None:
    node = node_factory("kvm-2cpu")
    ref = node.claim([result("cpu-numa0", cpus=1)])
    response = node.prepare(ref)
    assert not response.error
    spec = json.loads(node.driver.reconciler.cdi.path(ref.uid).read_text())
    podman.write_cdi_spec(spec)
    cdi_id = response.devices[0].cdi_device_ids[0]
    out = podman.run(["env"], devices=[cdi_id]).stdout
    cpus = node.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"]
    assert f"DRA_CPUSET_{ref.uid}={cpus}" in out.splitlines()
    assert f"DRA_MEMS_{ref.uid}=0" in out.splitlines()


def test_a_posix_shell_reads_the_claims_variables_by_their_shell_names(
    node_factory: NodeFactory, podman: Podman
) -> None:
    """busybox sh (a POSIX shell, like dash) drops DRA_CPUSET_<uid> (the UID's dashes make it no shell name) from
    what it passes on; DRA_CPUSET_<uid with _> and its siblings reach the commands a shell starts, and expand."""
    node = node_factory("kvm-2cpu")
    ref = node.claim([result("cpu-numa0", cpus=1)])
    response = node.prepare(ref)
    assert not response.error
    podman.write_cdi_spec(json.loads(node.driver.reconciler.cdi.path(ref.uid).read_text()))
    cdi_id = response.devices[0].cdi_device_ids[0]
    cpus = node.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"]
    name = ref.uid.replace("-", "_")
    seen = podman.run(["sh", "-c", "env"], devices=[cdi_id]).stdout.splitlines()
    assert f"DRA_CPUSET_{ref.uid}={cpus}" not in seen, "the shell dropped the upstream name"
    assert f"DRA_CPUSET_{name}={cpus}" in seen
    assert f"DRA_MEMS_{name}=0" in seen
    assert f"DRA_CLAIM_{name}=default/{ref.name}" in seen
    assert f"DRA_PODS_{name}={node.pod_uid}" in seen
    expanded = podman.run(["sh", "-c", f'echo "$DRA_CPUSET_{name}"'], devices=[cdi_id]).stdout
    assert expanded.strip() == str(cpus)


def test_a_container_reads_its_claims_device_metadata_at_the_standard_path(
    node_factory: NodeFactory, podman: Podman
) -> None:
    """KEP-5304: the metadata CDI device of the prepare answer bind-mounts the claim's file, read-only, where
    k8s.io/dynamic-resource-allocation/devicemetadata looks for it."""
    node = node_factory("kvm-2cpu")
    ref = node.claim([result("cpu-numa0", cpus=1)])
    response = node.prepare(ref)
    assert not response.error
    claim_id, metadata_id = response.devices[0].cdi_device_ids
    podman.write_cdi_spec(json.loads(node.driver.reconciler.cdi.path(ref.uid).read_text()))
    podman.write_cdi_spec(
        json.loads((node.driver.reconciler.cdi.root / f"dra.cpu_metadata_{ref.uid}_cpus.json").read_text())
    )
    host = node.plugin.paths.plugin_dir / f"dra-device-metadata/{ref.uid}_cpus.json"
    inside = f"{CONTAINER_DIR}/resourceclaims/{ref.name}/cpus/dra.cpu-metadata.json"

    out = podman.run(["cat", inside], devices=[claim_id, metadata_id]).stdout
    assert out.encode() == host.read_bytes()
    [device] = decode(out.encode())["requests"][0]["devices"]
    cpus = node.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"]
    assert device["attributes"]["dra.cpu/allocatedCPUs"] == {"string": str(cpus)}
    written = podman.run(["sh", "-c", f"echo x > {inside}"], devices=[claim_id, metadata_id], check=False)
    assert written.returncode != 0 and "Read-only file system" in written.stderr
