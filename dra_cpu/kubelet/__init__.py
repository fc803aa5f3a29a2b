"""Talking to the kubelet: plugin registration and the DRA gRPC services."""
