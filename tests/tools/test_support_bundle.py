"""`dra-cpu support-bundle`: one archive with the driver's view of the node, read back file by file against the
sources it was made from; a part that cannot be collected is named in the manifest and the rest is still there."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from dra_cpu import __version__, observe
from dra_cpu.cli import main
from dra_cpu.cli.common import EXIT_USAGE
from dra_cpu.node.sysfs import read_topology
from dra_cpu.store.checkpoint import claim_record
from tests.harness.claims import result
from tests.harness.nodes.standin import NodeFactory
from tests.harness.paths import SYSFS


def _read(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        files = {}
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is not None and member.name.startswith("dra-cpu-support/")
            files[member.name.removeprefix("dra-cpu-support/")] = extracted.read()
    return files


def test_the_archive_holds_what_the_driver_sees(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory("dual-socket-smt2")
    ref = node.claim([result("cpu-numa1", cpus=2), result("hugepages-2mi-numa1", request="mem", memory="4Mi")])
    assert not node.prepare(ref).error
    registry = CollectorRegistry()
    Gauge("dra_cpu_test_marker", "a metric only this test serves", registry=registry).set(7)
    http = observe.serve("127.0.0.1:0", registry, lambda: ["NRI not connected and synchronized"])
    port = http.server_address[1]
    out = tmp_path / "bundle.tar.gz"
    try:
        code = main(
            [
                "support-bundle",
                "--node-name", "node-a",
                "--sysfs-root", str(SYSFS / "dual-socket-smt2"),
                "--state-dir", str(node.driver.reconciler.checkpoint.directory),
                "--cdi-root", str(node.driver.reconciler.cdi.root),
                "--nri-socket", str(tmp_path / "nri.sock"),
                "--metrics-address", f"127.0.0.1:{port}",
                "--min-shared-cpus", "2",
                "-o", str(out),
            ]
        )  # fmt: skip
    finally:
        http.shutdown()
    assert code == 0
    files = _read(out.read_bytes())
    manifest = json.loads(files["manifest.json"])
    assert manifest["errors"] == {}
    assert manifest["node"] == "node-a" and manifest["versions"]["dra-cpu"] == __version__
    assert set(manifest["files"]) == set(files) - {"manifest.json"}

    topology = read_topology(SYSFS / "dual-socket-smt2")
    assert json.loads(files["topology.json"]) == json.loads(json.dumps(topology.as_dict()))
    devices = json.loads(files["devices.json"])
    assert devices["cpus"]["keptShared"] == "0-1" and devices["cpus"]["minSharedCpus"] == 2
    assert {d["name"]: d["capacity"] for d in devices["devices"]}["cpu-numa0"] == 6
    slices = list(yaml.safe_load_all(files["slices.yaml"]))
    assert {d["name"] for s in slices for d in s["spec"]["devices"]} == {d["name"] for d in devices["devices"]}

    assert files["checkpoint.json"] == node.driver.reconciler.checkpoint.path.read_bytes()
    [claim] = json.loads(files["state.json"])["claims"]
    assert claim["uid"] == ref.uid and claim == claim_record(node.driver.snapshot().ledger.claims[ref.uid])
    specs = {name for name in files if name.startswith("cdi/")}
    assert f"cdi/{node.driver.reconciler.cdi.path(ref.uid).name}" in specs
    assert any("_metadata_" in name for name in specs), specs
    assert (
        files[f"cdi/{node.driver.reconciler.cdi.path(ref.uid).name}"]
        == node.driver.reconciler.cdi.path(ref.uid).read_bytes()
    )

    assert json.loads(files["nri.json"]) == {
        "path": str(tmp_path / "nri.sock"),
        "exists": False,
        "error": "No such file or directory",
    }
    assert b"dra_cpu_test_marker 7.0" in files["metrics.txt"]
    assert files["readyz.txt"] == b"not ready: NRI not connected and synchronized\n"
    config = json.loads(files["config.json"])
    assert config["effective"]["minSharedCpus"] == 2 and config["error"] == ""


def test_what_cannot_be_read_is_named_and_the_rest_collected(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Settings the node refuses (minSharedCpus above its CPUs), no checkpoint, no CDI folder, no daemon: the
    bundle still holds the topology and says why each other part is missing. Standard output is the default."""
    closed = observe.serve("127.0.0.1:0", CollectorRegistry(), list)
    port = closed.server_address[1]
    closed.shutdown()
    closed.server_close()
    code = main(
        [
            "support-bundle",
            "--node-name", "node-a",
            "--sysfs-root", str(SYSFS / "kvm-2cpu"),
            "--state-dir", str(tmp_path / "state"),
            "--cdi-root", str(tmp_path / "cdi"),
            "--metrics-address", f"127.0.0.1:{port}",
            "--min-shared-cpus", "3",
        ]
    )  # fmt: skip
    assert code == 0
    files = _read(capsysbinary.readouterr().out)
    errors = json.loads(files["manifest.json"])["errors"]
    assert set(errors) == {"checkpoint", "cdi", "metrics", "readyz"}
    assert errors["checkpoint"] == f"{tmp_path / 'state/checkpoint.json'}: No such file or directory"
    assert errors["cdi"] == f"cdiRoot {tmp_path / 'cdi'} is not a folder"
    assert "is the daemon running on this node?" in errors["metrics"]
    assert "topology.json" in files
    assert json.loads(files["devices.json"])["settingsProblems"][0].startswith(
        "minSharedCpus 3: this node has 2 CPU(s)"
    )


def test_a_config_file_the_daemon_refuses_is_kept_as_written(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("reservedCPU: 0-1\n")
    out = tmp_path / "bundle.tar.gz"
    args = ["support-bundle", "--config", str(config), "--node-name", "n", "--sysfs-root", str(SYSFS / "kvm-2cpu")]
    assert main([*args, "-o", str(out)]) == 0
    files = _read(out.read_bytes())
    written = json.loads(files["config.json"])
    assert written["file"] == "reservedCPU: 0-1\n" and "unknown key 'reservedCPU'" in written["error"]
    assert "unknown key 'reservedCPU'" in json.loads(files["manifest.json"])["errors"]["config"]
    assert main([*args, "-o", str(tmp_path / "missing/bundle.tar.gz")]) == EXIT_USAGE
