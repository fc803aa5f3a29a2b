"""The kubelet's gRPC services a DRA plugin serves, by the names plugins advertise at registration, each with its
generated modules (messages, service stubs): the plugin serves them all, the kubelet stand-in (client.py) calls the
first the plugin advertises of those it knows."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from dra_cpu.kubelet import gen


def _generated(proto: str) -> tuple[ModuleType, ModuleType]:
    """The messages and the service stubs generated from protos/kubelet/<proto>.proto."""
    return import_module(f"{gen.__name__}.{proto}_pb2"), import_module(f"{gen.__name__}.{proto}_pb2_grpc")


# What a 1.34+ kubelet knows, in its order of preference.
DRA_SERVICES = {"v1.DRAPlugin": _generated("dra_v1"), "v1beta1.DRAPlugin": _generated("dra_v1beta1")}
# The health services a 1.37 kubelet knows, newest first: it takes the first one the plugin advertises.
HEALTH_SERVICES = {
    "v1.DRAResourceHealth": _generated("dra_health_v1"),
    "v1alpha1.DRAResourceHealth": _generated("dra_health_v1alpha1"),
}
