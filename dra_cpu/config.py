"""The daemon's configuration: defaults, then the YAML file (--config), then flags given on the command line.

The file is strict: an unknown key or a value of the wrong type is an error naming the key, because a typo in a
node-level setting (say `reservedCPU`) silently ignored would hand the system's CPUs to workloads.

The file also takes the upstream driver's keys (kubernetes-sigs/dra-driver-cpu's `driverConfig`, and the flags it
keeps out of its file) where they mean what one of ours does (UPSTREAM_KEYS), so that its config file works here;
docs/admin.md has the migration table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dra_cpu.core.cpuset import MAX_CPUS, CPUSet, parse_field
from dra_cpu.core.devices import DeviceConfig, DeviceMode, GroupBy
from dra_cpu.core.memory import DEFAULT_RESERVED_MEMORY, parse_reserved_memory
from dra_cpu.core.node_view import NodeSettings
from dra_cpu.errors import DraCpuError, shown
from dra_cpu.store.fileio import read_yaml

ENFORCEMENTS = ("nri", "cdi-hook", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# A day: long enough for any poll, short enough for threading's timeouts (which overflow near 1e9 seconds).
MAX_POLL_SECONDS = 86400.0


class ConfigError(DraCpuError):
    pass


@dataclass(frozen=True)
class UpstreamKey:
    """One of the upstream driver's config keys: the key of ours it sets, and what else its meaning implies."""

    ours: str
    implies: tuple[tuple[str, Any], ...] = ()
    why: str = ""


UPSTREAM_KEYS = {
    "cpuDeviceMode": UpstreamKey("deviceMode"),
    # Upstream keeps every container without a claim off its reserved CPUs: ours does that with strictReserved.
    "reservedCPUs": UpstreamKey("reservedCpus", (("strictReserved", True),), "upstream's reserved CPUs are strict"),
    "hostnameOverride": UpstreamKey("nodeName"),
    "publishNodeAllocatableResourceMapping": UpstreamKey("publishNodeAllocatableResources"),
    # Flags upstream does not take in its file (--bind-address, --expose-pcie-roots): accepted here all the same.
    "bindAddress": UpstreamKey("metricsAddress"),
    "exposePCIeRoots": UpstreamKey("publishPcieRoots"),
}
# The upstream driver's command-line flags (deprecated there in favour of its file), by the key each sets: taken
# here too, so that its DaemonSet's arguments start this driver. Its --group-by and --reserved-cpus are ours by
# name: the first means the same, the second is ours (not strict; docs/admin.md).
UPSTREAM_FLAGS = {
    "--cpu-device-mode": "cpuDeviceMode",
    "--hostname-override": "hostnameOverride",
    "--bind-address": "bindAddress",
    "--expose-pcie-roots": "exposePCIeRoots",
    "--sysfs-overlay": "sysfsOverlay",
}
# Go's strconv.ParseBool, which reads the upstream driver's boolean flags (`--expose-pcie-roots=false`).
_GO_BOOLS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}
UPSTREAM_API_VERSION = "v1alpha1"
# The upstream driver's keys that have no counterpart here, and what to do instead.
UPSTREAM_ONLY = {
    "sysfsOverlay": "dra-cpu reads a whole sysfs tree instead: sysfsRoot, a folder holding sys/ and proc/",
}


def _opt(help_text: str, flag: bool = True, choices: tuple[str, ...] = ()) -> Any:
    return {"help": help_text, "flag": flag, "choices": choices}


@dataclass(frozen=True)
class Config:
    node_name: str = field(default="", metadata=_opt("Kubernetes node name (default: $NODE_NAME or the hostname)"))
    driver_name: str = field(default="dra.cpu", metadata=_opt("DRA driver name and attribute domain"))
    kubeconfig: str = field(default="", metadata=_opt("kubeconfig file; empty: in-cluster config"))
    standalone: str = field(default="", metadata=_opt("a folder standing in for the API server (development, demo)"))
    sysfs_root: str = field(default="/", metadata=_opt("read DIR/sys and DIR/proc for topology"))
    kubelet_root_dir: str = field(default="/var/lib/kubelet", metadata=_opt("the kubelet's root folder"))
    cdi_root: str = field(default="/var/run/cdi", metadata=_opt("where CDI specs are written"))
    state_dir: str = field(default="/var/lib/dra-cpu", metadata=_opt("where the checkpoint lives"))
    nri_socket: str = field(default="/var/run/nri/nri.sock", metadata=_opt("the runtime's NRI socket"))
    nri_plugin_index: str = field(default="00", metadata=_opt("NRI plugin index, two digits"))
    device_mode: str = field(
        default="grouped",
        metadata=_opt("one device per NUMA node, or per CPU", choices=tuple(m.value for m in DeviceMode)),
    )
    group_by: str = field(
        default="numanode",
        metadata=_opt(
            "grouped mode: one device per NUMA node, socket, or for the machine",
            choices=tuple(g.value for g in GroupBy),
        ),
    )
    publish_node_allocatable_resources: bool = field(
        default=False,
        metadata=_opt("publish KEP-5517 nodeAllocatableResources (needs the DRANodeAllocatableResources gate)"),
    )
    device_metadata: bool = field(
        default=True,
        metadata=_opt("KEP-5304: write each claim's device metadata file and mount it into its containers (CDI)"),
    )
    publish_pcie_roots: bool = field(
        default=False,
        metadata=_opt(
            "list the PCIe roots local to each CPU device in resource.kubernetes.io/pcieRoot "
            "(needs the DRAListTypeAttributes gate)"
        ),
    )
    publish_numa_node_id: bool = field(
        default=True,
        metadata=_opt("copy the NUMA node id to <driver>/numaNodeID, which claims written for the upstream driver use"),
    )
    publish_dra_net_numa_node: bool = field(
        default=True,
        metadata=_opt("copy the NUMA node id to dra.net/numaNode, which claims matched with DRA network drivers use"),
    )
    reserved_cpus: str = field(default="", metadata=_opt("CPUs kept for system daemons, e.g. 0-1"))
    reserved_memory: str = field(
        default=DEFAULT_RESERVED_MEMORY,
        metadata=_opt(
            "memory of each NUMA node kept from claims for the system: a quantity or a share of the node, per node "
            "as <node>:<amount>, e.g. 5% or 1Gi,0:2Gi"
        ),
    )
    publish_memory: bool = field(
        default=True,
        metadata=_opt("publish each NUMA node's memory as a device (off: slices of CPUs and hugepages only)"),
    )
    whole_cores: bool = field(default=False, metadata=_opt("hand out whole physical cores only"))
    strict_reserved: bool = field(default=False, metadata=_opt("keep containers without claims off reserved CPUs"))
    min_shared_cpus: int = field(default=1, metadata=_opt("refuse claims that would leave fewer shared CPUs"))
    enforcement: str = field(default="nri", metadata=_opt("how decisions are enforced", choices=ENFORCEMENTS))
    metrics_address: str = field(default=":8080", metadata=_opt("host:port for /metrics, /healthz, /readyz"))
    hugepage_poll_seconds: float = field(default=30.0, metadata=_opt("re-read hugepage reservations this often"))
    log_level: str = field(default="info", metadata=_opt("log level", choices=LOG_LEVELS))
    log_format: str = field(default="text", metadata=_opt("log format", choices=LOG_FORMATS))

    def device_config(self) -> DeviceConfig:
        return DeviceConfig(
            node_name=self.node_name,
            driver_name=self.driver_name,
            reserved_cpus=self.reserved_cpu_set,
            device_mode=DeviceMode(self.device_mode),
            whole_cores=self.whole_cores,
            group_by=GroupBy(self.group_by),
            node_allocatable=self.publish_node_allocatable_resources,
            pcie_roots=self.publish_pcie_roots,
            upstream_numa_attribute=self.publish_numa_node_id,
            dranet_numa_attribute=self.publish_dra_net_numa_node,
            min_shared_cpus=self.min_shared_cpus,
            strict_reserved=self.strict_reserved,
            reserved_memory=parse_reserved_memory(self.reserved_memory),
            memory_devices=self.publish_memory,
        )

    def node_settings(self, cdi_hooks: tuple[dict[str, object], ...] = ()) -> NodeSettings:
        return NodeSettings(
            devices=self.device_config(),
            device_metadata=self.device_metadata,
            cdi_hooks=cdi_hooks,
        )

    @property
    def reserved_cpu_set(self) -> CPUSet:
        return parse_field("reservedCpus", self.reserved_cpus)

    def validate(self) -> Config:
        for f in fields(self):
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{_camel(f.name)} {shown(value)}: must be one of {', '.join(choices)}")
        index = self.nri_plugin_index
        if not (len(index) == 2 and index.isascii() and index.isdigit()):
            raise ConfigError(f"nriPluginIndex {shown(index)}: must be two digits, 00 to 99")
        if self.min_shared_cpus < 1:
            raise ConfigError(f"minSharedCpus {shown(self.min_shared_cpus)}: at least 1 CPU must stay shared")
        if self.min_shared_cpus > MAX_CPUS:
            raise ConfigError(f"minSharedCpus {shown(self.min_shared_cpus)}: must be at most {MAX_CPUS}")
        poll = self.hugepage_poll_seconds
        if not (math.isfinite(poll) and 0 < poll <= MAX_POLL_SECONDS):
            raise ConfigError(
                f"hugepagePollSeconds {poll}: must be a number of seconds above 0, at most {MAX_POLL_SECONDS:g}"
            )
        if not Path(self.kubelet_root_dir).is_absolute():
            raise ConfigError(f"kubeletRootDir {shown(self.kubelet_root_dir)}: must be an absolute path")
        if self.enforcement == "none" and not self.standalone:
            raise ConfigError("enforcement 'none' is for development: it needs --standalone")
        self.reserved_cpu_set  # noqa: B018 -- parsing is the check
        self.device_config()
        return self

    def as_dict(self) -> dict[str, Any]:
        return {_camel(f.name): getattr(self, f.name) for f in fields(self)}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key; default None so that only flags actually given override the file."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file (keys as below, in camelCase)")
    for f in fields(Config):
        meta = f.metadata
        # argparse formats help with %: a literal one (a percentage) is written twice.
        help_text = f"{meta['help']} (default {f.default!r})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type == "int":
            kwargs["type"] = int
        elif f.type == "float":
            kwargs["type"] = float
        parser.add_argument(_flag(f.name), **kwargs)
    upstream = parser.add_argument_group(
        "the upstream driver's flags (kubernetes-sigs/dra-driver-cpu), taken under its names"
    )
    for flag, key in UPSTREAM_FLAGS.items():
        ours = _field(UPSTREAM_KEYS[key].ours) if key in UPSTREAM_KEYS else None
        kwargs = {"dest": _upstream_dest(key), "default": None, "metavar": "VALUE"}
        if ours is not None and ours.type == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")  # Go's flag package: --flag, --flag=false
        upstream.add_argument(flag, help=f"as {_flag(ours.name)}" if ours else UPSTREAM_ONLY[key], **kwargs)


def load(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    values: dict[str, Any] = {}
    if args.config:
        values.update(_from_file(Path(args.config)))
    flagged = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    values.update(flagged)
    values.update(_upstream_flags(args, flagged))
    config = Config(**values)
    if not config.node_name:
        config = dataclasses.replace(config, node_name=environ.get("NODE_NAME") or _hostname())
    return config.validate()


def _upstream_dest(key: str) -> str:
    return f"upstream_{key}"


def _field(key: str) -> dataclasses.Field[Any]:
    """The field of Config whose key (camelCase) is `key`."""
    return next(f for f in fields(Config) if _camel(f.name) == key)


def _upstream_value(key: str, value: Any) -> Any:
    """An upstream key's value as upstream reads it: its node name lowercased."""
    return value.strip().lower() if key == "hostnameOverride" and isinstance(value, str) else value


def _upstream_flags(args: argparse.Namespace, flagged: dict[str, Any]) -> dict[str, Any]:
    """Our settings from the upstream driver's flags given; ConfigError for one without a counterpart, or one that
    contradicts our own flag for the same setting."""
    values: dict[str, Any] = {}
    for flag, key in UPSTREAM_FLAGS.items():
        value = getattr(args, _upstream_dest(key), None)
        if value is None:
            continue
        if key in UPSTREAM_ONLY:
            raise ConfigError(f"{flag} is the upstream driver's; {UPSTREAM_ONLY[key]}")
        upstream = UPSTREAM_KEYS[key]
        setting = _field(upstream.ours)
        if setting.type == "bool":
            if value.lower() not in _GO_BOOLS:
                raise ConfigError(f"{flag} {shown(value)}: must be true or false")
            value = _GO_BOOLS[value.lower()]
        settings = ((setting.name, _upstream_value(key, value)), *((_field(k).name, v) for k, v in upstream.implies))
        for ours, given in settings:
            if ours in flagged and flagged[ours] != given:
                raise ConfigError(f"{flag} and {_flag(ours)} both given, to different values: give one")
            values[ours] = given
    return values


def _hostname() -> str:
    return socket.gethostname().lower()


def _from_file(path: Path) -> dict[str, Any]:
    docs = read_yaml(path, "config file", ConfigError)
    if not docs:
        return {}
    doc = docs[0]
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, found {type(doc).__name__}")
    by_key = {_camel(f.name): f for f in fields(Config)}
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # our key -> the key of the file that set it

    def put(key: str, ours: str, value: Any) -> None:
        f = by_key[ours]
        if ours in given and values[f.name] != _typed(path, key, value, str(f.type)):
            raise ConfigError(
                f"config file {path}: {given[ours]} and {key} both set {ours}, to different values: give one"
            )
        values[f.name], given[ours] = _typed(path, key, value, str(f.type)), key

    for raw_key, value in doc.items():
        key = str(raw_key)
        if key in by_key:
            put(key, key, value)
        elif key in UPSTREAM_KEYS:
            upstream = UPSTREAM_KEYS[key]
            put(key, upstream.ours, _upstream_value(key, value))
            for ours, implied in upstream.implies:
                put(f"{key} ({upstream.why})", ours, implied)
        elif key == "apiVersion":
            if value != UPSTREAM_API_VERSION:
                raise ConfigError(
                    f"config file {path}: apiVersion {shown(value)}: the upstream driver's files say "
                    f"{UPSTREAM_API_VERSION!r}; dra-cpu's need none"
                )
        elif key in UPSTREAM_ONLY:
            raise ConfigError(f"config file {path}: {key} is the upstream driver's; {UPSTREAM_ONLY[key]}")
        else:
            known = ", ".join(sorted(by_key))
            raise ConfigError(
                f"config file {path}: unknown key {shown(key)} (known: {known}; and the upstream driver's "
                f"{', '.join(sorted(UPSTREAM_KEYS))})"
            )
    return values


def _typed(path: Path, key: str, value: Any, kind: str) -> Any:
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str) or (key == "reservedCpus" and isinstance(value, int)),
    }[kind]
    if not ok:
        raise ConfigError(f"config file {path}: {key} must be a {kind}, not {shown(value)}")
    if kind == "float" and isinstance(value, int) and abs(value) > MAX_POLL_SECONDS:
        value = math.inf  # float() of a 400-digit integer overflows; validate() names the key
    return float(value) if kind == "float" else str(value) if kind == "str" else value
