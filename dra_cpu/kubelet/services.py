"""The kubelet's gRPC services a DRA plugin serves, by the names plugins advertise at registration, each with its
generated modules (messages, service stubs): the plugin serves them all, the kubelet stand-in (client.py) calls the
first the plugin advertises of those it knows."""

from __future__ import annotations

from types import ModuleType

from dra_cpu.kubelet.gen import (
    dra_health_v1_pb2,
    dra_health_v1_pb2_grpc,
    dra_health_v1alpha1_pb2,
    dra_health_v1alpha1_pb2_grpc,
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
)

# What a 1.34+ kubelet knows, in its order of preference.
DRA_SERVICES: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1.DRAPlugin": (dra_v1_pb2, dra_v1_pb2_grpc),
    "v1beta1.DRAPlugin": (dra_v1beta1_pb2, dra_v1beta1_pb2_grpc),
}
# The health services a 1.37 kubelet knows, newest first: it takes the first one the plugin advertises.
HEALTH_SERVICES: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1.DRAResourceHealth": (dra_health_v1_pb2, dra_health_v1_pb2_grpc),
    "v1alpha1.DRAResourceHealth": (dra_health_v1alpha1_pb2, dra_health_v1alpha1_pb2_grpc),
}
