"""The DeviceClasses the dra-cpu chart installs (charts/dra-cpu/templates/deviceclasses.yaml with default values),
for `explain` without `--class`: most claims name one of them. tests/deploy/test_chart.py holds the two equal."""

from __future__ import annotations

from typing import Any

DEFAULT_DRIVER = "dra.cpu"
# The name the chart's values suggest for deviceClasses.extendedResourceName (KEP-5004).
EXTENDED_RESOURCE = f"{DEFAULT_DRIVER}/cpu"


def chart_device_classes(driver: str = DEFAULT_DRIVER, extended_resource: str = "") -> list[dict[str, Any]]:
    """The chart's classes with default values, and with `extended_resource` as deviceClasses.extendedResourceName
    (then one more: `<driver>.extended`)."""
    attrs = f"device.attributes[{driver!r}]".replace("'", '"')
    # The driver test comes first: && short-circuits, so devices of other drivers never reach an attribute lookup.
    match_driver = f'device.driver == "{driver}"'
    # Only isolated CPU devices carry `isolated` (true); slices of earlier versions say `false` on the others.
    isolated = f"has({attrs}.isolated) && {attrs}.isolated"
    expressions = {
        driver: f'{match_driver} && {attrs}.type == "cpu" && !({isolated})',
        f"{driver}.isolated": f'{match_driver} && {attrs}.type == "cpu" && {isolated}',
        "dra.hugepages-2mi": f'{match_driver} && {attrs}.type == "hugepages" && {attrs}.pageSize == "2Mi"',
        "dra.hugepages-1gi": f'{match_driver} && {attrs}.type == "hugepages" && {attrs}.pageSize == "1Gi"',
        f"{driver}.memory": f'{match_driver} && {attrs}.type == "memory"',
    }
    classes = [_class(name, expression) for name, expression in expressions.items()]
    if extended_resource:
        # A pod's `dra.cpu/cpu: N` asks for N devices of the class: only one-CPU devices (individual mode, which
        # alone carry cpuID) make that N CPUs.
        one_cpu = f"{expressions[driver]} && has({attrs}.cpuID)"
        classes.append(_class(f"{driver}.extended", one_cpu, extendedResourceName=extended_resource))
    return classes


def _class(name: str, expression: str, **spec: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": expression}}], **spec},
    }
