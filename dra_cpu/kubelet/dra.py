"""The DRA service (NodePrepareResources, NodeUnprepareResources): requests become ClaimRefs for the Driver, and
its results become responses. v1 and v1beta1 differ only in package and in v1's share_id, so one servicer serves
both.

With device metadata (KEP-5304) the servicer also has each prepared claim's metadata files and their CDI specs
written, and adds each request's metadata CDI id to the first device of that request, as the kubeletplugin helper
does; a claim whose files cannot be written is still prepared, without them (logged). A successful unprepare
removes them; failing that, the unprepare fails and the kubelet retries it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any, Protocol

import grpc

from dra_cpu.core import cdi_spec, device_metadata
from dra_cpu.core.claims import ClaimRef, ref_problem
from dra_cpu.core.device_metadata import RequestMetadata
from dra_cpu.core.state import PreparedClaim
from dra_cpu.driver import Driver, PreparedResult
from dra_cpu.errors import DraCpuError
from dra_cpu.kubelet.gen import dra_v1_pb2_grpc, dra_v1beta1_pb2_grpc

LOG = logging.getLogger("dra_cpu.kubelet")


class MetadataFiles(Protocol):
    """Where device metadata files and their CDI specs are written (store/metadata_files.MetadataStore)."""

    @property
    def enabled(self) -> bool: ...

    def write(self, requests: Iterable[RequestMetadata]) -> dict[str, str]:
        """Base request name -> the CDI device id that mounts its file."""

    def remove(self, ref: ClaimRef) -> None: ...

    def reconcile(self, claims: Mapping[str, PreparedClaim]) -> list[str]: ...


class DRAService(dra_v1_pb2_grpc.DRAPluginServicer, dra_v1beta1_pb2_grpc.DRAPluginServicer):
    """NodePrepareResources / NodeUnprepareResources for one API version (its generated module `pb2`)."""

    def __init__(self, driver: Driver, pb2: ModuleType, metadata: MetadataFiles | None = None) -> None:
        self.driver = driver
        self.pb2 = pb2
        self.metadata = metadata
        self.has_share_id = "share_id" in pb2.Device.DESCRIPTOR.fields_by_name

    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.pb2.NodePrepareResourcesResponse()
        refs, invalid = _refs(request.claims)
        for uid, error in invalid.items():
            response.claims[uid].error = error
        for uid, result in self.driver.prepare(refs).items():
            out = response.claims[uid]
            if result.claim is None:
                out.error = result.error
                continue
            metadata_ids = self._write_metadata(result)
            for device in result.claim.devices:
                ids = [cdi_spec.device_id(self.driver.config.driver_name, uid)]
                for name in device.request_names:
                    if name in metadata_ids:
                        ids.append(metadata_ids.pop(name))
                item = out.devices.add(
                    request_names=list(device.request_names),
                    pool_name=device.pool,
                    device_name=device.device,
                    cdi_device_ids=ids,
                )
                if self.has_share_id and device.share_id:
                    item.share_id = device.share_id
        return response

    def _write_metadata(self, result: PreparedResult) -> dict[str, str]:
        """Base request name -> metadata CDI id; empty when metadata is off or could not be written."""
        if self.metadata is None or not self.metadata.enabled or result.claim is None or result.request is None:
            return {}
        driver = self.driver
        try:
            requests = device_metadata.claim_requests(
                driver.config.driver_name,
                result.claim,
                result.request.request_names(),
                result.request.pod_claim_name,
                {d.name: d for d in driver.devices},
                driver.topology,
            )
            return self.metadata.write(requests)
        except DraCpuError as err:
            LOG.error(
                "device metadata not written: the claim's containers start without the metadata file",
                extra={"claimUID": result.claim.uid, "claim": str(result.claim.ref), "reason": str(err)},
            )
            return {}

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.pb2.NodeUnprepareResourcesResponse()
        refs, invalid = _refs(request.claims)
        for uid in invalid:
            # Prepare refuses such references, so nothing was ever prepared under one: nothing to undo.
            response.claims[uid].error = ""
        by_uid = {ref.uid: ref for ref in refs}
        for uid, error in self.driver.unprepare(refs).items():
            if not error and self.metadata is not None:
                try:
                    self.metadata.remove(by_uid[uid])
                except DraCpuError as err:
                    error = str(err)
            response.claims[uid].error = error
        return response


def _refs(claims: Any) -> tuple[list[ClaimRef], dict[str, str]]:
    refs, invalid = [], {}
    for claim in claims:
        problem = ref_problem(claim.namespace, claim.name, claim.uid)
        if problem:
            invalid[claim.uid] = problem
        else:
            refs.append(ClaimRef(namespace=claim.namespace, name=claim.name, uid=claim.uid))
    return refs, invalid
