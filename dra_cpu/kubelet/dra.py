"""The DRA service (NodePrepareResources, NodeUnprepareResources): requests become ClaimRefs for the Driver, and
its results become responses. v1 and v1beta1 differ only in package and in v1's share_id, so one servicer serves
both.

Each device of a prepared claim carries the CDI ids the driver gives it: the claim's own spec, and with device
metadata (KEP-5304) the metadata spec of each of its requests on the first device of that request, as the
kubeletplugin helper does. The driver writes and removes the metadata files with the claim's other files
(reconciler.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any, Protocol

import grpc

from dra_cpu.core.claims import ClaimRef, ref_problem
from dra_cpu.driver import PreparedResult
from dra_cpu.kubelet.gen import dra_v1_pb2_grpc, dra_v1beta1_pb2_grpc

LOG = logging.getLogger("dra_cpu.kubelet")


class Preparer(Protocol):
    """What the kubelet's calls need of the driver (driver.Driver)."""

    def prepare(self, refs: Iterable[ClaimRef]) -> Mapping[str, PreparedResult]: ...

    def unprepare(self, refs: Iterable[ClaimRef]) -> Mapping[str, str]:
        """Claim uid -> error, "" when done."""


class DRAService(dra_v1_pb2_grpc.DRAPluginServicer, dra_v1beta1_pb2_grpc.DRAPluginServicer):
    """NodePrepareResources / NodeUnprepareResources for one API version (its generated module `pb2`)."""

    def __init__(self, driver: Preparer, pb2: ModuleType) -> None:
        self.driver = driver
        self.pb2 = pb2
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
            for device, ids in zip(result.claim.devices, result.cdi_ids, strict=True):
                item = out.devices.add(
                    request_names=list(device.request_names),
                    pool_name=device.pool,
                    device_name=device.device,
                    cdi_device_ids=list(ids),
                )
                if self.has_share_id and device.share_id:
                    item.share_id = device.share_id
        return response

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.pb2.NodeUnprepareResourcesResponse()
        refs, invalid = _refs(request.claims)
        for uid in invalid:
            # Prepare refuses such references, so nothing was ever prepared under one: nothing to undo.
            response.claims[uid].error = ""
        for uid, error in self.driver.unprepare(refs).items():
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
