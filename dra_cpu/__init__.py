"""dra-cpu: a CPU/NUMA Dynamic Resource Allocation driver for Kubernetes."""

__version__ = "0.1.0"
