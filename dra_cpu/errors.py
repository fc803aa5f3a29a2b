"""The one error type the CLI turns into a single line and exit code 2, and `shown()`, the bounded way a message
names a value that came from outside."""

import reprlib

# A value from outside may be a megabyte of digits or a YAML alias bomb; a message shows a bounded part of it.
_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
_MAX_SHOWN = 160


class DraCpuError(Exception):
    """Bad input or environment that a person must fix; the message names the field and the value."""


def shown(value: object) -> str:
    """repr(value), cut to a few dozen characters and two levels, so that any input makes a one-line message."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int too long for str()
        return f"<an integer of {value.bit_length() if isinstance(value, int) else '?'} bits>"
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    if isinstance(value, str) and len(value) > _REPR.maxstring:
        text += f" ({len(value)} characters)"
    return text


def not_utf8(err: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, for the one line that names the file."""
    return f"byte {err.object[err.start : err.start + 1]!r} at offset {err.start}"
