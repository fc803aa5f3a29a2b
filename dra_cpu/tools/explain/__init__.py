"""`dra-cpu explain`: why a ResourceClaim fits a node or leaves its pod Pending, before or after it is applied.

The core is pure: claim + DeviceClasses + ResourceSlices + claims in use -> Explanation. It follows the scheduler's
structured allocator: each request's class and own CEL selectors, capacity rounded by the device's requestPolicy
against what allocated claims consumed, allocationMode and count, `firstAvailable` subrequests in order, and the
claim's matchAttribute/distinctAttribute constraints, all on one node. model, parse, search and
result are pure; inputs reads files; cli/explain.py prints.
"""
