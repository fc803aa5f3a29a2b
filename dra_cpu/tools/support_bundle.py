"""`dra-cpu support-bundle`: what the driver sees on this node, in one archive for a bug report (the upstream
driver's `gatherinfo`, and more).

Each part is collected on its own: a part that cannot be read (no checkpoint yet, no daemon answering on the
metrics port, settings the node refuses) is named with the reason in the manifest's `errors`, and the rest is
still collected. That is when a bundle is wanted most.

| file | what |
|---|---|
| manifest.json | versions (dra-cpu, Python, its libraries, the kernel), the node, when, the files, the errors |
| config.json | the effective configuration, and the config file as written |
| topology.json | the topology read from sysfs (`dra-cpu discover -o json`) |
| devices.json | which CPUs are claimable, reserved, cut or kept shared, the settings' problems, the devices |
| slices.yaml | the ResourceSlices this node publishes (`dra-cpu slices`) |
| checkpoint.json, state.json | the checkpoint as on disk, and the prepared claims it holds (or why it cannot be read) |
| cdi/ | the driver's CDI specs: one per prepared claim, one per device-metadata request |
| nri.json | the NRI socket the driver talks to, as the file system shows it |
| metrics.txt, readyz.txt | the running daemon's /metrics and /readyz |
"""

from __future__ import annotations

import io
import json
import platform
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from dra_cpu import __version__
from dra_cpu.config import Config
from dra_cpu.core.capacity import settings_problems, split_cpus
from dra_cpu.core.cdi_spec import CDI_CLASS
from dra_cpu.core.devices import build_devices, build_slices
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError
from dra_cpu.node.sysfs import read_topology
from dra_cpu.store.checkpoint import FILENAME, claim_record, decode, unrestorable_record
from dra_cpu.tools.render import dump_objects

# The libraries whose versions a bug report needs.
LIBRARIES = ("grpcio", "protobuf", "kubernetes", "prometheus-client", "pyudev", "psutil", "PyYAML")
HTTP_SECONDS = 5.0


@dataclass
class Bundle:
    """Files by name in the archive, and the parts that could not be collected with why."""

    files: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def json(self, name: str, value: Any) -> None:
        self.files[name] = json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"

    def part(self, name: str, collect: Callable[[], None]) -> None:
        """Run one collector; whatever it raises is recorded under `name`, never the end of the bundle."""
        try:
            collect()
        except OSError as err:
            self.errors[name] = f"{err.filename}: {err.strerror}" if err.filename else str(err)
        except (DraCpuError, ValueError) as err:
            self.errors[name] = str(err) or type(err).__name__

    def archive(self, manifest: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        entries = {"manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n", **self.files}
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, data in entries.items():
                info = tarfile.TarInfo(f"dra-cpu-support/{name}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()


def collect(config: Config, config_error: str = "", config_text: str = "") -> bytes:
    """The archive (a gzipped tar) for the node `config` describes. `config_error`: why the configuration given
    could not be used (the defaults stand in for it then)."""
    bundle = Bundle()
    bundle.json("config.json", {"effective": config.as_dict(), "file": config_text, "error": config_error})
    if config_error:
        bundle.errors["config"] = config_error
    topology: list[Topology] = []

    def read() -> None:
        topology.append(read_topology(Path(config.sysfs_root), pcie_roots=config.publish_pcie_roots))
        bundle.json("topology.json", topology[0].as_dict())

    bundle.part("topology", read)
    if topology:
        bundle.part("devices", lambda: _devices(bundle, config, topology[0]))
    bundle.part("checkpoint", lambda: _checkpoint(bundle, Path(config.state_dir)))
    bundle.part("cdi", lambda: _cdi(bundle, Path(config.cdi_root), config.driver_name))
    bundle.part("nri", lambda: bundle.json("nri.json", _socket(Path(config.nri_socket))))
    for path in ("metrics", "readyz"):
        bundle.part(path, partial(_fetch, bundle, config.metrics_address, path))
    manifest = {
        "tool": "dra-cpu support-bundle",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "node": config.node_name,
        "versions": _versions(),
        "files": sorted(bundle.files),
        "errors": bundle.errors,
    }
    return bundle.archive(manifest)


def _devices(bundle: Bundle, config: Config, topology: Topology) -> None:
    device_config = config.device_config()
    split = split_cpus(topology, device_config)
    devices = build_devices(topology, device_config)
    bundle.json(
        "devices.json",
        {
            "cpus": {
                "claimable": str(split.claimable),
                "reserved": str(split.reserved),
                "cut": str(split.cut),
                "keptShared": str(split.kept_shared),
                "minSharedCpus": split.floor.minimum,
                "notShared": str(split.floor.excluded),
            },
            "settingsProblems": list(settings_problems(topology, device_config)),
            "devices": [
                {"name": d.name, "type": d.type.value, "cpus": str(d.cpus), "capacity": d.capacity, "step": d.step}
                for d in devices
            ],
        },
    )
    bundle.files["slices.yaml"] = dump_objects(build_slices(devices, device_config), "yaml").encode()


def _checkpoint(bundle: Bundle, state_dir: Path) -> None:
    data = (state_dir / FILENAME).read_bytes()
    bundle.files["checkpoint.json"] = data
    checkpoint = decode(data, str(state_dir / FILENAME))
    bundle.json(
        "state.json",
        {
            "bootID": checkpoint.boot_id,
            "version": checkpoint.version,
            "claims": [claim_record(c) for c in checkpoint.ledger.claims.values()],
            "unrestorable": [unrestorable_record(u) for u in checkpoint.ledger.unrestorable.values()],
        },
    )


def _cdi(bundle: Bundle, cdi_root: Path, driver: str) -> None:
    """The driver's own specs only: the CDI folder also holds other drivers'."""
    if not cdi_root.is_dir():
        raise DraCpuError(f"cdiRoot {cdi_root} is not a folder")
    specs = {*cdi_root.glob(f"{driver}-{CDI_CLASS}_claim-*.json"), *cdi_root.glob(f"{driver}_metadata_*.json")}
    for path in sorted(specs):
        bundle.files[f"cdi/{path.name}"] = path.read_bytes()


def _socket(path: Path) -> dict[str, Any]:
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return {"path": str(path), "exists": False, "error": err.strerror}
    return {"path": str(path), "exists": True, "isSocket": stat.S_ISSOCK(mode), "mode": oct(stat.S_IMODE(mode))}


def _fetch(bundle: Bundle, address: str, path: str) -> None:
    host, _, port = address.rpartition(":")
    url = f"http://{host or '127.0.0.1'}:{port}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_SECONDS) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        body = err.read()  # /readyz answers 503 with its reasons
    except (urllib.error.URLError, TimeoutError) as err:
        raise DraCpuError(f"{url}: {getattr(err, 'reason', err)} (is the daemon running on this node?)") from None
    bundle.files[f"{path}.txt"] = body


def _versions() -> dict[str, str]:
    versions = {
        "dra-cpu": __version__,
        "python": sys.version.split()[0],
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "machine": platform.machine(),
    }
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
