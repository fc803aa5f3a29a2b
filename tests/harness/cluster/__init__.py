"""The Kubernetes control plane on loopback, what tests make on it, and the driver installed with helm."""
