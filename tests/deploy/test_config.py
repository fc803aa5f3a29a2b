"""`dra-cpu run --config FILE`: bad files and bad mounts stop the daemon with one line naming the key or path and
exit code 2; flags given on the command line override the file; the docs and the chart know every key."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest

from dra_cpu.cli import build_parser, main
from dra_cpu.cli.common import EXIT_USAGE
from dra_cpu.config import UPSTREAM_KEYS, Config, ConfigError, load
from dra_cpu.core.devices import GroupBy
from tests.harness.paths import FIXTURES, REPO

KEYS = {f.name: "".join(p.capitalize() if i else p for i, p in enumerate(f.name.split("_"))) for f in fields(Config)}


def dra_cpu_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dra_cpu", "run", *args], capture_output=True, text=True, timeout=60, check=False
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The daemon's one-line complaint, after checking that it exited 2 with nothing else on stderr but logs."""
    assert result.returncode == EXIT_USAGE, result.stderr
    complaints = [line for line in result.stderr.splitlines() if line.startswith("dra-cpu run: ")]
    assert len(complaints) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return complaints[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('reservedCPU: "0-1"\n', "unknown key 'reservedCPU'"),
        ("wholeCores: yes please\n", "wholeCores must be a bool"),
        ("minSharedCpus: 1.5\n", "minSharedCpus must be a int"),
        ("metricsAddress: 8080\n", "metricsAddress must be a str"),
        ("deviceMode: fancy\n", "deviceMode 'fancy': must be one of grouped, individual"),
        ("groupBy: numa\n", "groupBy 'numa': must be one of numanode, socket, machine"),
        ("publishNodeAllocatableResources: 1\n", "publishNodeAllocatableResources must be a bool"),
        ("publishPcieRoots: yes please\n", "publishPcieRoots must be a bool"),
        ('reservedCpus: "0-x"\n', "reservedCpus '0-x'"),
        ("enforcement: none\n", "enforcement 'none' is for development: it needs --standalone"),
        ("minSharedCpus: 0\n", "minSharedCpus 0: at least 1 CPU must stay shared"),
        ('nriPluginIndex: "7"\n', "nriPluginIndex '7': must be two digits"),
        ("hugepagePollSeconds: 0\n", "hugepagePollSeconds 0.0: must be a number of seconds above 0"),
        ("driverName: CPU_Driver\n", "invalid driver name 'CPU_Driver'"),
        ("- wholeCores\n", "expected a mapping of keys, found list"),
        ("wholeCores: [\n", "is not valid YAML"),
    ],
    ids=[
        "unknown-key",
        "wrong-type-bool",
        "wrong-type-int",
        "wrong-type-str",
        "bad-choice",
        "bad-group-by",
        "wrong-type-mapping",
        "wrong-type-pcie-roots",
        "bad-cpu-list",
        "dev-enforcement-outside-standalone",
        "no-shared-cpus",
        "nri-index",
        "poll-interval",
        "driver-name",
        "not-a-mapping",
        "not-yaml",
    ],
)
def test_bad_config_file(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content)
    assert expected in refused(dra_cpu_run("--config", str(path)))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--hugepage-poll-seconds", "nan"], "hugepagePollSeconds nan: must be a number of seconds above 0"),
        (["--hugepage-poll-seconds", "inf"], "hugepagePollSeconds inf: must be"),
        (["--hugepage-poll-seconds", "-1"], "hugepagePollSeconds -1.0: must be"),
        (["--hugepage-poll-seconds", "1e300"], "at most 86400"),
        (["--min-shared-cpus", "9" * 40], "minSharedCpus 9999999999999999999999999999999999999999: must be at most"),
        (["--kubelet-root-dir", "var/lib/kubelet"], "kubeletRootDir 'var/lib/kubelet': must be an absolute path"),
        (["--reserved-cpus", "0-99999999"], "reservedCpus '0-99999999': cpu id '99999999'"),
        (["--nri-plugin-index", "\u0661\u0662"], "nriPluginIndex"),
    ],
)
def test_bad_numbers_and_paths_from_flags_are_one_line_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--node-name", "n", *argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dra-cpu run: ") and err.count("\n") == 1, err
    assert expected in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hugepagePollSeconds: .nan\n", "hugepagePollSeconds nan: must be"),
        (b"hugepagePollSeconds: -.inf\n", "hugepagePollSeconds -inf: must be"),
        (b"hugepagePollSeconds: 1" + b"0" * 400 + b"\n", "hugepagePollSeconds inf: must be"),
        (b"minSharedCpus: 1" + b"0" * 5000 + b"\n", "holds a value YAML cannot build"),
        (b"logLevel: \xff\xfe\n", "is not UTF-8 text: byte b'\\xff' at offset 10"),
    ],
    ids=["nan", "minus-inf", "float-overflow", "5000-digit-int", "not-utf8"],
)
def test_bad_numbers_and_bytes_in_the_config_file_are_one_line_and_exit_2(
    tmp_path: Path, content: bytes, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    assert main(["run", "--node-name", "n", "--config", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dra-cpu run: ") and err.count("\n") == 1, err
    assert expected in err


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    assert f"config file {missing}: no such file" in refused(dra_cpu_run("--config", str(missing)))


def load_args(*argv: str, environ: dict[str, str] | None = None) -> Config:
    return load(build_parser().parse_args(["run", *argv]), environ or {"NODE_NAME": "env-node"})


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("minSharedCpus: 3\nwholeCores: true\nlogLevel: debug\nreservedCpus: 0\n")
    from_file = load_args("--config", str(path))
    assert (from_file.min_shared_cpus, from_file.whole_cores, from_file.log_level) == (3, True, "debug")
    assert from_file.reserved_cpus == "0"  # a bare number in YAML is still a cpu list
    assert from_file.node_name == "env-node"

    flagged = load_args("--config", str(path), "--min-shared-cpus", "2", "--no-whole-cores", "--node-name", "n1")
    assert (flagged.min_shared_cpus, flagged.whole_cores, flagged.node_name) == (2, False, "n1")
    assert flagged.log_level == "debug"  # not given as a flag: the file's value stays
    assert flagged.hugepage_poll_seconds == Config().hugepage_poll_seconds  # in neither: the default


def test_grouping_and_node_allocatable_reach_the_device_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("groupBy: socket\npublishNodeAllocatableResources: true\n")
    config = load_args("--config", str(path))
    device = config.device_config()
    assert (device.group_by, device.node_allocatable) == (GroupBy.SOCKET, True)
    assert (Config().group_by, Config().publish_node_allocatable_resources) == ("numanode", False)
    flagged = load_args("--config", str(path), "--group-by", "machine", "--no-publish-node-allocatable-resources")
    assert (flagged.device_config().group_by, flagged.device_config().node_allocatable) == (GroupBy.MACHINE, False)


def test_pcie_roots_are_off_by_default_and_reach_the_device_config(tmp_path: Path) -> None:
    assert Config().publish_pcie_roots is False
    assert Config(node_name="n").device_config().pcie_roots is False
    path = tmp_path / "config.yaml"
    path.write_text("publishPcieRoots: true\n")
    assert load_args("--config", str(path)).device_config().pcie_roots is True
    assert load_args("--config", str(path), "--no-publish-pcie-roots").device_config().pcie_roots is False
    assert load_args("--publish-pcie-roots").device_config().pcie_roots is True


def test_a_flag_cannot_make_the_file_valid_if_the_result_is_not(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("enforcement: none\n")
    with pytest.raises(ConfigError, match="needs --standalone"):
        load_args("--config", str(path))
    assert load_args("--config", str(path), "--standalone", str(tmp_path)).enforcement == "none"


def standalone_run(tmp_path: Path, **paths: str) -> subprocess.CompletedProcess[str]:
    """`dra-cpu run` on a fixture topology with every host folder under tmp_path unless given."""
    folders = {
        "kubelet-root-dir": str(tmp_path / "kubelet"),
        "cdi-root": str(tmp_path / "cdi"),
        "state-dir": str(tmp_path / "state"),
        **paths,
    }
    return dra_cpu_run(
        "--standalone",
        str(tmp_path / "cluster"),
        "--enforcement",
        "none",
        "--node-name",
        "n",
        "--sysfs-root",
        str(FIXTURES / "sysfs" / "kvm-2cpu"),
        "--metrics-address",
        "127.0.0.1:0",
        *(arg for key, value in folders.items() for arg in (f"--{key}", value)),
    )


@pytest.mark.parametrize(
    ("flag", "key"),
    [("cdi-root", "cdiRoot"), ("state-dir", "stateDir"), ("kubelet-root-dir", "cannot prepare socket")],
)
def test_unusable_host_folder_stops_the_daemon_naming_it(tmp_path: Path, flag: str, key: str) -> None:
    # A folder under a regular file can be created by nobody, root included: what a wrong or missing mount gives.
    # Short, so that the kubelet sockets under it fit a unix socket path and the folder is what fails.
    with tempfile.NamedTemporaryFile(prefix="dra-cpu-") as blocker:
        bad = Path(blocker.name) / "sub"
        line = refused(standalone_run(tmp_path, **{flag: str(bad)}))
    assert key in line
    assert str(bad) in line
    assert "Not a directory" in line


def test_missing_sysfs_names_the_path(tmp_path: Path) -> None:
    line = refused(
        dra_cpu_run(
            "--standalone", str(tmp_path), "--enforcement", "none", "--sysfs-root", str(tmp_path / "host"),
            "--node-name", "n",
        )
    )  # fmt: skip
    assert f"{tmp_path / 'host'}/sys/devices/system/cpu does not exist" in line


def test_the_upstream_drivers_config_file_works(tmp_path: Path) -> None:
    """kubernetes-sigs/dra-driver-cpu's keys, where they mean what ours do: its reserved CPUs are strict."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "apiVersion: v1alpha1\n"
        "cpuDeviceMode: individual\n"
        "groupBy: socket\n"
        'reservedCPUs: "0-1"\n'
        "publishNodeAllocatableResourceMapping: true\n"
        "hostnameOverride: Node-A\n"
        "kubeconfig: /etc/kubeconfig\n"
        "bindAddress: 127.0.0.1:9090\n"
        "exposePCIeRoots: true\n"
    )
    config = load(build_parser().parse_args(["run", "--config", str(path)]), {})
    assert (config.device_mode, config.group_by, config.reserved_cpus, config.strict_reserved) == (
        "individual",
        "socket",
        "0-1",
        True,
    )
    assert (config.node_name, config.kubeconfig, config.metrics_address) == (
        "node-a",
        "/etc/kubeconfig",
        "127.0.0.1:9090",
    )
    assert config.publish_node_allocatable_resources and config.publish_pcie_roots
    # The same setting twice, under both names, agreeing: fine.
    path.write_text("cpuDeviceMode: grouped\ndeviceMode: grouped\n")
    assert load(build_parser().parse_args(["run", "--config", str(path)]), {"NODE_NAME": "n"}).device_mode == "grouped"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            'reservedCPUs: "0"\nstrictReserved: false\n',
            "reservedCPUs (upstream's reserved CPUs are strict) and strictReserved both set strictReserved, to "
            "different values: give one",
        ),
        ("deviceMode: grouped\ncpuDeviceMode: individual\n", "deviceMode and cpuDeviceMode both set deviceMode"),
        ("apiVersion: v2\n", "apiVersion 'v2': the upstream driver's files say 'v1alpha1'; dra-cpu's need none"),
        ("sysfsOverlay: {}\n", "sysfsOverlay is the upstream driver's; dra-cpu reads a whole sysfs tree instead"),
        ("cpuDeviceMode: cores\n", "deviceMode 'cores': must be one of grouped, individual"),
    ],
)
def test_upstream_keys_that_contradict_or_have_no_counterpart_are_one_line(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load(build_parser().parse_args(["run", "--config", str(path)]), {"NODE_NAME": "n"})
    assert expected in str(err.value)


def test_the_upstream_drivers_flags_work() -> None:
    """Its DaemonSet's arguments, as its chart writes them, start this driver with the same settings."""
    config = load_args(
        "--cpu-device-mode=individual",
        "--hostname-override",
        "Node-B",
        "--bind-address=:9091",
        "--expose-pcie-roots=false",
        "--group-by=socket",
    )
    assert (config.device_mode, config.node_name, config.metrics_address, config.group_by) == (
        "individual",
        "node-b",
        ":9091",
        "socket",
    )
    assert not config.publish_pcie_roots
    assert load_args("--expose-pcie-roots").publish_pcie_roots
    assert load_args("--expose-pcie-roots=T").publish_pcie_roots
    # The same setting under both names, agreeing: fine.
    assert load_args("--cpu-device-mode", "grouped", "--device-mode", "grouped").device_mode == "grouped"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ("--cpu-device-mode", "individual", "--device-mode", "grouped"),
            "--cpu-device-mode and --device-mode both given, to different values: give one",
        ),
        (("--expose-pcie-roots=maybe",), "--expose-pcie-roots 'maybe': must be true or false"),
        (("--sysfs-overlay", "/x"), "--sysfs-overlay is the upstream driver's; dra-cpu reads a whole sysfs tree"),
        (("--cpu-device-mode", "cores"), "deviceMode 'cores': must be one of grouped, individual"),
    ],
)
def test_upstream_flags_that_contradict_or_have_no_counterpart_are_one_line(
    argv: tuple[str, ...], expected: str
) -> None:
    assert expected in refused(dra_cpu_run(*argv))


def test_every_key_is_documented_and_the_chart_offers_only_real_keys() -> None:
    admin = (REPO / "docs" / "admin.md").read_text()
    undocumented = [key for key in [*KEYS.values(), *UPSTREAM_KEYS] if f"`{key}`" not in admin]
    assert not undocumented, f"docs/admin.md does not describe {undocumented}"
    schema = json.loads((REPO / "charts" / "dra-cpu" / "values.schema.json").read_text())
    assert set(schema["properties"]["config"]["properties"]) <= set(KEYS.values())
