"""The DeviceClasses the dra-cpu chart installs (charts/dra-cpu/templates/deviceclasses.yaml with default values),
for `explain` without `--class`: most claims name one of them. tests/deploy/test_chart.py holds the two equal."""

from __future__ import annotations

from typing import Any

DEFAULT_DRIVER = "dra.cpu"


def chart_device_classes(driver: str = DEFAULT_DRIVER) -> list[dict[str, Any]]:
    attrs = f"device.attributes[{driver!r}]".replace("'", '"')
    # The driver test comes first: && short-circuits, so devices of other drivers never reach an attribute lookup.
    match_driver = f'device.driver == "{driver}"'
    expressions = {
        driver: f'{match_driver} && {attrs}.type == "cpu" && !{attrs}.isolated',
        f"{driver}.isolated": f'{match_driver} && {attrs}.type == "cpu" && {attrs}.isolated',
        "dra.hugepages-2mi": f'{match_driver} && {attrs}.type == "hugepages" && {attrs}.pageSize == "2Mi"',
        "dra.hugepages-1gi": f'{match_driver} && {attrs}.type == "hugepages" && {attrs}.pageSize == "1Gi"',
        f"{driver}.memory": f'{match_driver} && {attrs}.type == "memory"',
    }
    return [
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {"selectors": [{"cel": {"expression": expression}}]},
        }
        for name, expression in expressions.items()
    ]
