"""Structured logs: fields on every line, and no field that logging itself reserves (that raises at run time)."""

from __future__ import annotations

import ast
import json
import logging

import pytest

from dra_cpu.logs import JSONFormatter, KeyValueFormatter, operation
from tests.harness.paths import REPO

RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def test_no_log_call_uses_a_reserved_field() -> None:
    offenders = []
    for path in REPO.joinpath("dra_cpu").rglob("*.py"):
        if "gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "extra" and isinstance(node.value, ast.Dict):
                offenders += [
                    f"{path}:{node.lineno} {k.value}"
                    for k in node.value.keys
                    if isinstance(k, ast.Constant) and k.value in RESERVED
                ]
    assert offenders == []


@pytest.mark.parametrize("formatter", [JSONFormatter(), KeyValueFormatter()])
def test_operation_fields_on_every_line(formatter: logging.Formatter, caplog: pytest.LogCaptureFixture) -> None:
    log = operation(logging.getLogger("t"), "prepare", claimUID="u-1").bind(pods="p-1")
    with caplog.at_level(logging.INFO):
        log.info("first")
        log.warning("second", extra={"reason": "bad value 'x'"})
    lines = [formatter.format(r) for r in caplog.records]
    assert len(lines) == 2
    for line in lines:
        assert "u-1" in line and "p-1" in line and "prepare" in line
    if isinstance(formatter, JSONFormatter):
        doc = json.loads(lines[1])
        assert doc["reason"] == "bad value 'x'" and doc["claimUID"] == "u-1" and doc["opID"]
