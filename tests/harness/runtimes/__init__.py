"""Container runtimes on this machine: containerd (CRI, CDI, NRI) with a CRI client, podman, and a scripted NRI
runtime for protocol tests."""
