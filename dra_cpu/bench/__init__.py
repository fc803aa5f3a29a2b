"""`dra-cpu bench`: what NUMA alignment and CPU isolation buy on this node.

Pure parts (numa_maps parsing and placement checks, statistics, reports) are separate from the parts that touch the
kernel (mempolicy syscalls, cgroups, the measuring loops), so the former are tested on recorded samples.
"""
