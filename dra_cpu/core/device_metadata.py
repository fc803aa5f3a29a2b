"""Device metadata for containers (KEP-5304, beta in Kubernetes 1.37), as values: the file a container reads at the
standard path, the CDI spec that bind-mounts it there, and the reader of such files. store/metadata_files.py writes
and removes them.

What the 1.37 kubeletplugin helper (k8s.io/dynamic-resource-allocation v0.37.2, kubeletplugin/metadata.go with
api/metadata) does for a driver that enables device metadata, done here on our own data:

- one file per request of a prepared claim, on the host (the helper's
  `<kubeletRoot>/plugins/<driver>/dra-device-metadata/<namespace>_<claim>/<request>/metadata.json`; ours differs,
  see below), `<request>` being the base request name (before any `/subrequest`);
- in the container at `/var/run/kubernetes.io/dra-device-attributes/resourceclaims/<claim>/<request>/` +
  `<driver>-metadata.json`, or `.../resourceclaimtemplates/<podClaimName>/<request>/<driver>-metadata.json` for a
  claim made from a template (the claim's `resource.kubernetes.io/pod-claim-name` annotation names the pod's entry);
- the file is a JSON stream: the same DeviceMetadata object (`metadata.resource.k8s.io`) once per API version,
  newest first (v1beta1, then v1alpha1 for 1.36-era readers), each followed by a newline; a reader takes the first
  object whose apiVersion it knows and skips the others;
- a CDI spec per request, `<cdiRoot>/<driver>_metadata_<claimUID>_<request>.json`, kind `<driver>/metadata`, device
  `<claimUID>_<request>`, with one read-only bind mount of the file; its id `<driver>/metadata=<claimUID>_<request>`
  is added to the first device of that request in the NodePrepareResources answer.

Where the file lies on the host is the driver's own business (only the CDI mount names it): ours is
`<kubeletRoot>/plugins/<driver>/dra-device-metadata/<claimUID>_<request>.json` (folder 0755, file 0644), one flat
folder. The helper's two folders per claim cost a disk such as ext4 more than the rest of a prepare's files together
(a mkdir and an rmdir each journal an inode and a block: some 0.4 ms per prepare and unprepare, against 0.07 ms for
the file alone), and a name keyed by the claim's uid cannot be taken by a claim made again under the same name.
Start-up moves files of the helper's layout, as an earlier dra-cpu wrote them, to ours (store/metadata_files.py).

The attributes of each device are those the ResourceSlice publishes, plus what the claim got from it:
`<driver>/allocatedNumCPUs` (int, as upstream), `<driver>/allocatedCPUs` (the kernel list, e.g. `4-7,12`, left out
when longer than an attribute string's 64 characters: DRA_CPUSET_<uid> always has it), `<driver>/allocatedMemoryNodes`
(the NUMA nodes, kernel list) and, for hugepages, `<driver>/allocatedHugepagesBytes` (int). Values are single
int, bool, string or version attributes only: the list types exist in 1.37 but are alpha (DRAListTypeAttributes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dra_cpu.core.claims import POD_CLAIM_NAME_ANNOTATION, ClaimRef, ClaimRequest
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import MAX_STRING_ATTRIBUTE, Device
from dra_cpu.core.ledger import ClaimMetadata, PreparedClaim, PreparedDevice
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError

GROUP = "metadata.resource.k8s.io"
# Newest first: a reader takes the first version it knows. The 1.37 helper requires v1beta1 and accepts v1alpha1.
VERSIONS = ("v1beta1", "v1alpha1")
KIND = "DeviceMetadata"
CONTAINER_DIR = "/var/run/kubernetes.io/dra-device-attributes"
CLAIMS_SUBDIR = "resourceclaims"
TEMPLATES_SUBDIR = "resourceclaimtemplates"
HOST_SUBDIR = "dra-device-metadata"
CDI_CLASS = "metadata"
MAX_ATTRIBUTES = 32
_ATTRIBUTE_TYPES = ("int", "bool", "string", "version", "ints", "bools", "strings", "versions")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class MetadataError(DraCpuError):
    pass


@dataclass(frozen=True)
class RequestMetadata:
    """One metadata file: a claim's request (`name` as the allocation names it, subrequest included) and the
    devices that serve it, each a DeviceMetadata device object."""

    ref: ClaimRef
    pod_claim_name: str | None
    name: str
    devices: tuple[Mapping[str, Any], ...]

    @property
    def base_request(self) -> str:
        return self.name.split("/", 1)[0]


# --- names and paths ---------------------------------------------------------------------------------------------


def host_file_name(uid: str, request: str) -> str:
    """`<claimUID>_<request>.json`: unambiguous, as neither a uid nor a DNS label holds `_`."""
    return f"{uid}_{request}.json"


def host_file_key(name: str) -> tuple[str, str] | None:
    """The (claim uid, request) a host file's name is for; None for a name that is not one."""
    uid, sep, rest = name.partition("_")
    if not sep or not uid or not rest.endswith(".json") or len(rest) == len(".json"):
        return None
    return uid, rest[: -len(".json")]


def host_file(plugin_dir: str, uid: str, request: str) -> str:
    """The file on the host; `plugin_dir` is `<kubeletRoot>/plugins/<driver>`."""
    return f"{plugin_dir}/{HOST_SUBDIR}/{host_file_name(uid, request)}"


def container_file(driver: str, claim_name: str, pod_claim_name: str | None, request: str) -> str:
    """Where the container reads it (api/metadata helpers.go: ResourceClaimFilePath, ResourceClaimTemplateFilePath)."""
    if pod_claim_name:
        return f"{CONTAINER_DIR}/{TEMPLATES_SUBDIR}/{pod_claim_name}/{request}/{driver}-metadata.json"
    return f"{CONTAINER_DIR}/{CLAIMS_SUBDIR}/{claim_name}/{request}/{driver}-metadata.json"


def cdi_device_name(uid: str, request: str) -> str:
    return f"{uid}_{request}"


def cdi_device_id(driver: str, uid: str, request: str) -> str:
    return f"{driver}/{CDI_CLASS}={cdi_device_name(uid, request)}"


def cdi_spec_filename(driver: str, uid: str, request: str) -> str:
    return f"{driver}_{CDI_CLASS}_{uid}_{request}.json"


def cdi_spec_prefix(driver: str, uid: str = "") -> str:
    """The start of the spec file names of one claim (of every claim when `uid` is empty)."""
    return f"{driver}_{CDI_CLASS}_{uid}_" if uid else f"{driver}_{CDI_CLASS}_"


# --- what a claim's containers read ------------------------------------------------------------------------------


def claim_metadata(request: ClaimRequest) -> ClaimMetadata:
    """What the metadata files of the claim `request` is prepared for will name (core/ledger.ClaimMetadata), checked
    as claim_requests() checks it, so that a prepare that records it can always write the files."""
    _check_names(request.ref, {r.base_request for r in request.results}, request.pod_claim_name)
    return ClaimMetadata(request.pod_claim_name, tuple(sorted(set(request.request_names().values()))))


def claim_requests(
    driver: str,
    claim: PreparedClaim,
    request_names: Mapping[str, str],
    pod_claim: str | None,
    devices: Mapping[str, Device],
    topology: Topology,
) -> list[RequestMetadata]:
    """One RequestMetadata per request of a prepared claim, by base request name. `request_names` maps base names to
    the names the allocation gave (with a subrequest); `devices` are the devices published now, by name."""
    _check_names(claim.ref, {base for prepared in claim.devices for base in prepared.request_names}, pod_claim)
    by_request: dict[str, list[Mapping[str, Any]]] = {}
    for prepared in claim.devices:
        for base in prepared.request_names:
            by_request.setdefault(base, []).append(
                device_entry(driver, prepared, devices.get(prepared.device), topology)
            )
    return [
        RequestMetadata(claim.ref, pod_claim, request_names.get(base, base), tuple(entries))
        for base, entries in sorted(by_request.items())
    ]


def _check_names(ref: ClaimRef, requests: Iterable[str], pod_claim: str | None) -> None:
    """Names that become path parts must be DNS labels (the API server makes them so; a standalone folder might
    not)."""
    if pod_claim is not None and not _DNS_LABEL.fullmatch(pod_claim):
        raise MetadataError(f"claim {ref}: annotation {POD_CLAIM_NAME_ANNOTATION} {pod_claim!r} is not a DNS label")
    for base in sorted(requests):
        if not _DNS_LABEL.fullmatch(base):
            raise MetadataError(f"claim {ref}: request name {base!r} is not a DNS label")


def device_entry(driver: str, prepared: PreparedDevice, published: Device | None, topology: Topology) -> dict[str, Any]:
    """A DeviceMetadata device: its published attributes and what the claim got from it."""
    grant: list[tuple[str, dict[str, Any]]] = []
    if prepared.cpus:
        grant.append((f"{driver}/allocatedNumCPUs", {"int": len(prepared.cpus)}))
        cpus = str(prepared.cpus)
        if len(cpus) <= MAX_STRING_ATTRIBUTE:
            grant.append((f"{driver}/allocatedCPUs", {"string": cpus}))
        grant.append((f"{driver}/allocatedMemoryNodes", {"string": str(topology.numa_nodes_of(prepared.cpus))}))
    if prepared.hugepages is not None:
        grant.append((f"{driver}/allocatedHugepagesBytes", {"int": prepared.hugepages.bytes}))
        grant.append((f"{driver}/allocatedMemoryNodes", {"string": str(CPUSet.of([prepared.hugepages.numa_node]))}))
    published_attributes = published.to_api()["attributes"] if published is not None else {}
    attributes = dict(grant)
    for key, value in published_attributes.items():
        if len(attributes) >= MAX_ATTRIBUTES:
            break
        attributes.setdefault(key, value)
    entry: dict[str, Any] = {"driver": driver, "pool": prepared.pool, "name": prepared.device}
    if attributes:
        entry["attributes"] = dict(sorted(attributes.items()))
    return entry


def document(request: RequestMetadata, version: str, generation: int = 1) -> dict[str, Any]:
    """The DeviceMetadata object of one API version, its keys in the order the Go types declare them."""
    doc: dict[str, Any] = {
        "kind": KIND,
        "apiVersion": f"{GROUP}/{version}",
        "metadata": {
            "name": request.ref.name,
            "namespace": request.ref.namespace,
            "uid": request.ref.uid,
            "generation": generation,
        },
    }
    if request.pod_claim_name:
        doc["podClaimName"] = request.pod_claim_name
    doc["requests"] = [{"name": request.name, "devices": [dict(d) for d in request.devices]}]
    return doc


def cdi_spec(driver: str, request: RequestMetadata, host_path: str, cdi_version: str) -> dict[str, Any]:
    container_path = container_file(driver, request.ref.name, request.pod_claim_name, request.base_request)
    return {
        "cdiVersion": cdi_version,
        "kind": f"{driver}/{CDI_CLASS}",
        "devices": [
            {
                "name": cdi_device_name(request.ref.uid, request.base_request),
                "containerEdits": {
                    "mounts": [{"hostPath": host_path, "containerPath": container_path, "options": ["ro", "bind"]}]
                },
            }
        ],
    }


# --- reading a file back -----------------------------------------------------------------------------------------


def check(obj: Mapping[str, Any]) -> None:
    """The v1beta1 validation rules (api/metadata/v1beta1 types and validation.go: the names' formats, at most 32
    attributes, each with exactly one value member, strings of at most 64 characters); a MetadataError names the
    first problem."""

    def fail(path: str, why: str) -> MetadataError:
        return MetadataError(f"device metadata {obj.get('apiVersion')}: {path}: {why}")

    pod_claim = obj.get("podClaimName")
    if pod_claim is not None and not (isinstance(pod_claim, str) and _DNS_LABEL.fullmatch(pod_claim)):
        raise fail("podClaimName", f"{pod_claim!r} is not a DNS label")
    requests = obj.get("requests") or []
    if not isinstance(requests, list):
        raise fail("requests", "not a list")
    for i, request in enumerate(requests):
        if not isinstance(request, dict) or not isinstance(request.get("name"), str) or not request["name"]:
            raise fail(f"requests[{i}].name", "required")
        for j, device in enumerate(request.get("devices") or []):
            path = f"requests[{i}].devices[{j}]"
            if not isinstance(device, dict):
                raise fail(path, "not an object")
            driver, pool, name = device.get("driver"), device.get("pool"), device.get("name")
            if not (isinstance(driver, str) and len(driver) <= 63 and _DNS_SUBDOMAIN.fullmatch(driver)):
                raise fail(f"{path}.driver", f"{driver!r} is not a DNS subdomain of at most 63 characters")
            if not (
                isinstance(pool, str) and len(pool) <= 253 and all(_DNS_SUBDOMAIN.fullmatch(p) for p in pool.split("/"))
            ):
                raise fail(f"{path}.pool", f"{pool!r} is not a resource pool name")
            if not (isinstance(name, str) and _DNS_LABEL.fullmatch(name)):
                raise fail(f"{path}.name", f"{name!r} is not a DNS label")
            attributes = device.get("attributes") or {}
            if not isinstance(attributes, dict) or len(attributes) > MAX_ATTRIBUTES:
                raise fail(f"{path}.attributes", f"at most {MAX_ATTRIBUTES} attributes")
            for key, value in attributes.items():
                members = [t for t in _ATTRIBUTE_TYPES if isinstance(value, dict) and value.get(t) not in (None, [])]
                if len(members) != 1:
                    raise fail(f"{path}.attributes[{key}]", f"exactly one of {', '.join(_ATTRIBUTE_TYPES)} must be set")
                member = value[members[0]]
                for item in member if isinstance(member, list) else [member]:
                    if isinstance(item, str) and len(item) > MAX_STRING_ATTRIBUTE:
                        raise fail(f"{path}.attributes[{key}]", f"longer than {MAX_STRING_ATTRIBUTE} characters")
