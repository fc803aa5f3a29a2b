"""Talking to the container runtime through NRI (ttrpc over a multiplexed unix socket)."""
