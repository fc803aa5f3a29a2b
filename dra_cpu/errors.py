"""The one error type the CLI turns into a single line and exit code 2."""


class DraCpuError(Exception):
    """Bad input or environment that a person must fix; the message names the field and the value."""
