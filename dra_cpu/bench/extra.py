"""The error for a missing optional `bench` dependency (numpy, matplotlib), with the command that fixes it."""

from dra_cpu.errors import DraCpuError


class MissingExtraError(DraCpuError):
    def __init__(self, module: str) -> None:
        super().__init__(f"{module} is not installed; it comes with the bench extra: pip install 'dra-cpu[bench]'")
