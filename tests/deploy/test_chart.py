"""charts/dra-cpu rendered by the real helm: lint, schema, the objects' content, and the config file the daemon gets.

Every rendered object must pass the offline Kubernetes schemas of 1.34 (the oldest supported) and 1.37; the
ConfigMap's config file must load in the daemon's own config loader with the paths the DaemonSet mounts.
"""

from __future__ import annotations

import argparse
import dataclasses
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml

from dra_cpu.cli import build_parser
from dra_cpu.config import Config, load
from dra_cpu.core.devices import build_devices, build_slices
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.explain.classes import chart_device_classes
from tests.harness.cluster.chart import chart_values
from tests.harness.cluster.helm import CHART, Helm
from tests.harness.paths import REPO, SYSFS
from tests.harness.typed import as_dict

# Non-default values that change what the templates produce (paths, names, optional objects, enforcement).
CUSTOM = (
    "--set",
    "driverName=cpu.example.com",
    "--set",
    "kubeletRootDir=/var/lib/k0s/kubelet",
    "--set",
    "cdiRoot=/etc/cdi",
    "--set",
    "stateDir=/var/lib/example-cpu",
    "--set",
    "nriSocket=/run/nri/nri.sock",
    "--set",
    "metricsPort=9464",
    "--set",
    "hostNetwork=true",
    "--set",
    "metricsHost=127.0.0.1",
    "--set",
    "apiServer.host=10.1.2.3",
    "--set",
    "apiServer.port=6443",
    "--set",
    "config.enforcement=cdi-hook",
    "--set",
    "config.wholeCores=true",
    "--set",
    "config.groupBy=socket",
    "--set",
    "config.publishNodeAllocatableResources=true",
    "--set",
    "config.publishPcieRoots=true",
    "--set-string",
    "config.reservedCpus=0-1",
    "--set-string",
    "config.reservedMemory=1Gi\\,0:3Gi",
    "--set",
    "nodeSlicePolicy.enabled=false",
    "--set-string",
    "nodeSelector.node-role\\.example\\.com/bare-metal=true",
    "--set",
    "deviceClasses.extra[0].name=cpu.example.com.numa0",
    "--set",
    'deviceClasses.extra[0].selectors[0]=device.attributes["cpu.example.com"].numaNodeID == 0',
)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = by_kind(objects, kind)
    return obj


def daemon_config(objects: list[dict[str, Any]], tmp_path: Path) -> Config:
    """The ConfigMap's config file, loaded the way `dra-cpu run --config FILE` loads it on the node."""
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["config.yaml"])
    args: argparse.Namespace = build_parser().parse_args(["run", "--config", str(path)])
    return load(args, {"NODE_NAME": "node-a"})


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return as_dict(c, "the DaemonSet's container")


def host_mounts(objects: list[dict[str, Any]]) -> dict[str, tuple[str, bool]]:
    """container mount path -> (host path, read-only) for every hostPath volume."""
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    return {
        m["mountPath"]: (host[m["name"]], bool(m.get("readOnly")))
        for m in container(objects)["volumeMounts"]
        if m["name"] in host
    }


def test_lint_strict(helm: Helm) -> None:
    for options in ((), CUSTOM):
        result = helm.lint(options)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("options", [(), CUSTOM], ids=["defaults", "custom"])
@pytest.mark.parametrize("version", ["1.34.0", "1.37.0"])
def test_rendered_objects_pass_the_kubernetes_schema(helm: Helm, options: tuple[str, ...], version: str) -> None:
    objects = helm.template(*options)
    assert len(objects) >= 8
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_defaults(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template()
    assert sorted(o["kind"] for o in objects) == sorted(
        [
            "ServiceAccount",
            "ConfigMap",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            *["DeviceClass"] * 5,
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    c = container(objects)
    assert c["command"] == ["dra-cpu"]
    assert c["args"] == ["run", "--config", "/etc/dra-cpu/config.yaml"]
    config_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/dra-cpu")
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    config_volume = next(v for v in pod["volumes"] if v["name"] == config_mount["name"])
    assert config_volume["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    # No apiServer.host: the client finds the API server through the kubernetes Service, as every pod does.
    assert [e["name"] for e in c["env"]] == ["NODE_NAME"]

    config = daemon_config(objects, tmp_path)
    assert (config.node_name, config.driver_name, config.enforcement) == ("node-a", "dra.cpu", "nri")
    # Node-allocatable mappings are off while the gate is alpha; one device per NUMA node.
    assert (config.group_by, config.publish_node_allocatable_resources, config.publish_pcie_roots) == (
        "numanode",
        False,
        False,
    )
    # Every folder the daemon uses on the host is mounted at the same path; /sys read-only but for the cgroups
    # (NRI writes hugepage claims' hugetlb reservation limits).
    assert host_mounts(objects) == {
        "/var/lib/kubelet/plugins": ("/var/lib/kubelet/plugins", False),
        "/var/lib/kubelet/plugins_registry": ("/var/lib/kubelet/plugins_registry", False),
        config.cdi_root: (config.cdi_root, False),
        str(Path(config.nri_socket).parent): (str(Path(config.nri_socket).parent), False),
        config.state_dir: (config.state_dir, False),
        "/sys": ("/sys", True),
        "/sys/fs/cgroup": ("/sys/fs/cgroup", False),
    }
    assert config.kubelet_root_dir == "/var/lib/kubelet"

    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert config.metrics_address == ":8080"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostNetwork"] is False
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "privileged" not in c["securityContext"]


def test_custom_values(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template(*CUSTOM)
    config = daemon_config(objects, tmp_path)
    assert config.driver_name == "cpu.example.com"
    assert config.enforcement == "cdi-hook"
    assert config.whole_cores is True
    assert config.reserved_cpus == "0-1"
    assert config.reserved_memory == "1Gi,0:3Gi"
    assert (config.group_by, config.publish_node_allocatable_resources, config.publish_pcie_roots) == (
        "socket",
        True,
        True,
    )
    # What the node then publishes: socket devices whose consumed CPUs count against node allocatable cpu.
    device_config = dataclasses.replace(config.device_config(), driver_name="dra.cpu")
    slices = build_slices(build_devices(read_topology(SYSFS / "dual-socket-smt2"), device_config), device_config)
    devices = {d["name"]: d for s in slices for d in s["spec"]["devices"]}
    assert sorted(devices) == ["cpu-socket0", "cpu-socket1", "hugepages-2mi-numa0", "hugepages-2mi-numa1"]
    assert devices["cpu-socket1"]["nodeAllocatableResources"] == {
        "cpu": {"mapping": {"capacityKey": "dra.cpu/cpu", "capacityMultiplier": "1"}}
    }
    assert devices["hugepages-2mi-numa0"]["nodeAllocatableResources"] == {
        "hugepages-2Mi": {"mapping": {"capacityKey": "dra.cpu/memory", "capacityMultiplier": "1"}}
    }
    assert config.metrics_address == "127.0.0.1:9464"
    # The in-cluster client is pointed at the API server itself, not at the Service (no kube-proxy needed).
    env = {e["name"]: e.get("value") for e in container(objects)["env"]}
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("10.1.2.3", "6443")
    assert config.kubelet_root_dir == "/var/lib/k0s/kubelet"
    # cdi-hook needs no NRI socket, so its folder is not mounted.
    assert host_mounts(objects) == {
        "/var/lib/k0s/kubelet/plugins": ("/var/lib/k0s/kubelet/plugins", False),
        "/var/lib/k0s/kubelet/plugins_registry": ("/var/lib/k0s/kubelet/plugins_registry", False),
        "/etc/cdi": ("/etc/cdi", False),
        "/var/lib/example-cpu": ("/var/lib/example-cpu", False),
        "/sys": ("/sys", True),
    }
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"node-role.example.com/bare-metal": "true"}
    assert container(objects)["ports"][0]["containerPort"] == 9464
    assert not by_kind(objects, "ValidatingAdmissionPolicy")
    classes = {
        c["metadata"]["name"]: [s["cel"]["expression"] for s in c["spec"]["selectors"]]
        for c in by_kind(objects, "DeviceClass")
    }
    # The attribute domain follows the driver name in the built-in classes and guards the extra one.
    assert 'device.driver == "cpu.example.com"' in classes["dra.cpu"][0]
    assert 'device.attributes["cpu.example.com"].type == "cpu"' in classes["dra.cpu"][0]
    assert classes["cpu.example.com.numa0"] == [
        'device.driver == "cpu.example.com"',
        'device.attributes["cpu.example.com"].numaNodeID == 0',
    ]


def test_config_changes_roll_the_pods(helm: Helm) -> None:
    def checksum(*options: str) -> str:
        pod = one(helm.template(*options), "DaemonSet")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/config"])

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "config.minSharedCpus=2")


def test_rbac_is_only_what_the_daemon_calls(helm: Helm) -> None:
    objects = helm.template()
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in one(objects, "ClusterRole")["rules"]
    }
    assert rules == {
        (("",), ("nodes",)): {"get"},
        (("",), ("pods",)): {"get", "list", "watch"},
        (("resource.k8s.io",), ("resourceslices",)): {"list", "watch", "create", "update", "delete"},
        (("resource.k8s.io",), ("resourceclaims",)): {"get"},
    }
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(objects, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(objects, "ServiceAccount")["metadata"]["name"],
            "namespace": "kube-system",
        }
    ]


def test_node_slice_policy_binds_the_driver_to_its_node(helm: Helm) -> None:
    objects = helm.template(namespace="dra-system")
    policy = one(objects, "ValidatingAdmissionPolicy")["spec"]
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    assert policy["failurePolicy"] == "Fail"
    (rule,) = policy["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"]) == (["resource.k8s.io"], ["resourceslices"])
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    (condition,) = policy["matchConditions"]
    assert f'"system:serviceaccount:dra-system:{sa}"' in condition["expression"]
    variables = {v["name"]: v["expression"] for v in policy["variables"]}
    assert "'authentication.kubernetes.io/node-name'" in variables["userNodeName"]
    assert "spec.?nodeName" in variables["objectNodeName"]
    assert [v["expression"] for v in policy["validations"]] == [
        'variables.userNodeName != ""',
        "variables.userNodeName == variables.objectNodeName",
    ]
    binding = one(objects, "ValidatingAdmissionPolicyBinding")["spec"]
    assert binding == {
        "policyName": one(objects, "ValidatingAdmissionPolicy")["metadata"]["name"],
        "validationActions": ["Deny"],
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--set-string", "config.wholeCores=yes"), "wholeCores"),
        (("--set", "config.groupBy=numa"), "groupBy"),
        (("--set-string", "config.publishNodeAllocatableResources=true"), "publishNodeAllocatableResources"),
        (("--set-string", "config.publishPcieRoots=true"), "publishPcieRoots"),
        (("--set", "config.reservedCPUs=0-1"), "reservedCPUs"),
        (("--set-string", "config.reservedMemory=lots"), "reservedMemory"),
        (("--set", "config.kubeletRootDir=/x"), "kubeletRootDir"),
        (("--set", "config.enforcement=none"), "enforcement"),
        (("--set-string", "metricsPort=http"), "metricsPort"),
        (("--set", "cdiRoot=relative/cdi"), "cdiRoot"),
        (("--set", "driverName=CPU_Driver"), "driverName"),
        (("--set", "apiServer.port=0"), "apiServer"),
        (("--set", "apiServer.host=https://x"), "apiServer"),
        (("--set", "metricsHost=::1"), "metricsHost"),
        (("--set", "kubeletRootDir=/" + "k" * 80), "more than a unix socket path may have"),
    ],
    ids=[
        "wrong-type",
        "group-by",
        "mapping-type",
        "pcie-roots-type",
        "unknown-key",
        "reserved-memory",
        "path-key-in-config",
        "dev-only-enforcement",
        "port-type",
        "relative-path",
        "driver-name",
        "api-server-port",
        "api-server-url",
        "metrics-host",
        "socket-too-long",
    ],
)
def test_bad_values_are_refused(helm: Helm, options: tuple[str, ...], message: str) -> None:
    results = [helm.run("template", "x", str(CHART), *options)]
    # helm lint reports a template's `fail` only as INFO; schema errors it does fail on.
    if "socket" not in message:
        results.append(helm.lint(options))
    for result in results:
        assert result.returncode != 0
        assert message in result.stderr + result.stdout


@pytest.mark.parametrize("extended", ["", "dra.cpu/cpu"], ids=["default", "extended-resource"])
def test_explain_knows_the_charts_default_device_classes(helm: Helm, extended: str) -> None:
    """Also with deviceClasses.extendedResourceName (KEP-5004) set, which adds one class (hack/bench/scale.py uses
    the Python copy)."""
    options = ("--set", f"deviceClasses.extendedResourceName={extended}") if extended else ()
    rendered = [
        {**obj, "metadata": {"name": obj["metadata"]["name"]}}
        for obj in by_kind(helm.template(*options), "DeviceClass")
    ]
    assert rendered == chart_device_classes(extended_resource=extended)


def test_device_classes_are_created_on_the_api_server(
    helm: Helm, kube_api: kubernetes.client.ApiClient, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    names = {
        key: f"{key.lower()}-{suffix}.example.com"
        for key in ("cpu", "isolated", "hugepages2Mi", "hugepages1Gi", "memory")
    }
    options = [arg for key, name in names.items() for arg in ("--set", f"deviceClasses.{key}={name}")]
    classes = by_kind(helm.template(*options), "DeviceClass")
    objects = kubernetes.client.CustomObjectsApi(kube_api)
    for obj in classes:
        objects.create_cluster_custom_object("resource.k8s.io", "v1", "deviceclasses", obj, field_validation="Strict")
    try:
        for obj in classes:
            stored = as_dict(
                objects.get_cluster_custom_object("resource.k8s.io", "v1", "deviceclasses", obj["metadata"]["name"])
            )
            assert stored["spec"] == obj["spec"]
        assert {c["metadata"]["name"] for c in classes} == set(names.values())
    finally:
        for obj in classes:
            objects.delete_cluster_custom_object(
                "resource.k8s.io", "v1", "deviceclasses", obj["metadata"]["name"], _preload_content=False
            )


def test_admin_docs_show_the_values_the_real_node_tests_install_with() -> None:
    """docs/admin.md's values.yaml for a node without kube-proxy is what tests/e2e/test_node_*.py install with, but
    for metricsHost: the tests bind the node's own address, which they know; the docs leave it empty (every address of
    the node, the pod's IP among them, where the kubelet probes)."""
    text = (REPO / "docs" / "admin.md").read_text()
    block = text.split("# dra-cpu values: a node without kube-proxy and without a registry\n", 1)[1]
    documented = yaml.safe_load(block.split("```", 1)[0])
    assert documented == chart_values(
        node_name="node-a",
        metrics_host="",
        api_server_port=6443,
        metrics_port=8080,
        kubelet_root_dir="/var/lib/kubelet",
        cdi_root="/var/run/cdi",
        nri_socket="/var/run/nri/nri.sock",
        state_dir="/var/lib/dra-cpu",
    )
