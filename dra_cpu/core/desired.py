"""What the node should have, derived from the ledger and a NodeView: the second half of "decide as data". Pure.

Four things on the node must agree with the ledger (core/ledger.py), and each is derived here, nowhere else:
- the checkpoint holds the ledger itself (store/checkpoint.py encodes it);
- each prepared claim has one CDI spec (`ClaimFiles.cdi_spec`) carrying its grant into its containers;
- each request of a prepared claim with device metadata (KEP-5304) has one metadata file and the CDI spec that
  mounts it (`ClaimFiles.metadata`);
- every container has one pin: its claims' CPUs and memory nodes, or the shared pool (`pins`, read per container
  by core/entitlement.pin_for).
An unrestorable claim has none of these: only its report, in the checkpoint. reconciler.py makes the node match.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dra_cpu.core import cdi_spec, device_metadata
from dra_cpu.core.device_metadata import MetadataError, RequestMetadata
from dra_cpu.core.entitlement import Pools, pools
from dra_cpu.core.ledger import Ledger, PreparedClaim
from dra_cpu.core.node_view import NodeView


@dataclass(frozen=True)
class MetadataFile:
    """One request's device metadata file, and through `request` the CDI spec that mounts it."""

    request: RequestMetadata
    # The file is kept as found, only its CDI spec is derived: a claim that is not named (rebuilt from its CDI
    # spec) cannot say what its devices are until the kubelet's next prepare of it names them.
    as_found: bool = False


@dataclass(frozen=True)
class ClaimFiles:
    """What one prepared claim puts on the node besides its checkpoint record."""

    uid: str
    cdi_spec: Mapping[str, Any]
    metadata: tuple[MetadataFile, ...] = ()
    # Why the metadata files cannot be derived (then `metadata` is empty); "" when they can.
    metadata_problem: str = ""


def claim_files(claim: PreparedClaim, view: NodeView) -> ClaimFiles:
    settings = view.settings
    spec = cdi_spec.build_spec(settings.driver_name, claim, claim.mems(view.topology), settings.cdi_hooks)
    try:
        metadata = _metadata_files(claim, view)
    except MetadataError as err:
        return ClaimFiles(claim.uid, spec, metadata_problem=str(err))
    return ClaimFiles(claim.uid, spec, metadata)


def _metadata_files(claim: PreparedClaim, view: NodeView) -> tuple[MetadataFile, ...]:
    recorded = claim.metadata
    if recorded is None:
        return ()
    if not claim.named:
        return tuple(
            MetadataFile(RequestMetadata(claim.ref, recorded.pod_claim_name, name, ()), as_found=True)
            for name in recorded.requests
        )
    names = {name.split("/", 1)[0]: name for name in recorded.requests}
    requests = device_metadata.claim_requests(
        view.settings.driver_name, claim, names, recorded.pod_claim_name, view.device_index, view.topology
    )
    return tuple(MetadataFile(r) for r in requests)


def pins(ledger: Ledger, view: NodeView) -> Pools:
    """What every container's pin is computed from: the prepared claims and the shared pool."""
    settings = view.settings
    return pools(ledger, view.topology, settings.devices.reserved_cpus, settings.devices.strict_reserved)


def cdi_ids(claim: PreparedClaim, driver: str, metadata: Mapping[str, str]) -> tuple[tuple[str, ...], ...]:
    """Per device of `claim`, the CDI device ids the kubelet hands the runtime: the claim's own, and the metadata
    id of a request (`metadata`: base request name -> id, those written) on the first device that serves it, as
    the kubeletplugin helper does."""
    pending = dict(metadata)
    out = []
    for device in claim.devices:
        ids = [cdi_spec.device_id(driver, claim.uid)]
        ids += [pending.pop(name) for name in device.request_names if name in pending]
        out.append(tuple(ids))
    return tuple(out)
