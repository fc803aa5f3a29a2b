"""Structured logs: every line of an operation carries its fields (claim UID, namespace/name, operation id)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class OperationLog(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to an operation's fields; `bind` adds more (e.g. the claim once it is known)."""

    def __init__(self, logger: logging.Logger, fields: Mapping[str, Any]) -> None:
        super().__init__(logger, dict(fields))

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs

    def bind(self, **fields: Any) -> OperationLog:
        return OperationLog(self.logger, {**(self.extra or {}), **fields})


def operation(logger: logging.Logger, op: str, **fields: Any) -> OperationLog:
    return OperationLog(logger, {"op": op, "opID": os.urandom(4).hex(), **fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"time={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}",
            f"level={record.levelname}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        parts += [
            f"{k}={json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}"
            for k, v in _fields(record).items()
        ]
        if record.exc_info:
            parts.append(f"error={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **{
                k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
                for k, v in _fields(record).items()
            },
        }
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
