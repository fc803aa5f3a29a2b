"""Generates CustomResourceDefinitions for the resource.k8s.io/v1 types the tests need.

The test API server (k8s.io/apiextensions-apiserver) serves no built-in types, so ResourceSlice, ResourceClaim and
DeviceClass are served as CRDs whose structural schemas come from kubernetes-validate's offline JSON schemas of a
real Kubernetes release. Fields that release does not know are pruned, as a real server of that release would.

    .venv/bin/python hack/testenv/apiserver/gen_crds.py            # rewrite crds/*.yaml
    .venv/bin/python hack/testenv/apiserver/gen_crds.py --check    # exit 1 if crds/*.yaml are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

# The oldest release the driver supports: a schema this old makes the server drop newer fields as a 1.34 cluster does.
KUBERNETES_VERSION = "1.34.0"
GROUP = "resource.k8s.io"
VERSION = "v1"
CRD_DIR = Path(__file__).parent / "crds"

Schema = dict[str, Any]

_DEFS_PREFIX = "#/$defs/"
_META = "io.k8s.apimachinery.pkg.apis.meta.v1."
# Types whose JSON schema is not structural: map them to what a CRD can say about them.
_SPECIAL_REFS: dict[str, Schema] = {
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"x-kubernetes-int-or-string": True},
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"x-kubernetes-int-or-string": True},
    _META + "Time": {"type": "string", "format": "date-time"},
    _META + "MicroTime": {"type": "string", "format": "date-time"},
}
_COPIED_KEYS = ("format", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type")
# Documentation, strategic-merge-patch hints (this server answers strategic merge patch with 415) and OpenAPI
# extensions a CRD schema may not carry.
_DROPPED_KEYS = frozenset(
    {
        "description",
        "x-kubernetes-group-version-kind",
        "x-kubernetes-patch-merge-key",
        "x-kubernetes-patch-strategy",
        "x-kubernetes-unions",
    }
)


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    namespaced: bool
    status: bool
    selectable_fields: tuple[str, ...] = ()


RESOURCES = (
    # Field selectors on these two are how kubelets and drivers list their own slices.
    Resource(
        "ResourceSlice",
        "resourceslices",
        namespaced=False,
        status=False,
        selectable_fields=(".spec.nodeName", ".spec.driver"),
    ),
    # The scheduler writes status.allocation through the status subresource.
    Resource("ResourceClaim", "resourceclaims", namespaced=True, status=True),
    Resource("DeviceClass", "deviceclasses", namespaced=False, status=False),
)


class SchemaConverter:
    """Turns OpenAPI-derived JSON schema definitions into structural CRD schemas, inlining every $ref."""

    def __init__(self, definitions: dict[str, Schema]) -> None:
        self._definitions = definitions
        self._resolving: list[str] = []

    def definition(self, name: str) -> Schema:
        if name in _SPECIAL_REFS:
            return dict(_SPECIAL_REFS[name])
        if name in self._resolving:
            raise ValueError(f"recursive schema {' -> '.join([*self._resolving, name])} cannot be inlined in a CRD")
        self._resolving.append(name)
        try:
            return self.convert(self._definitions[name], name)
        finally:
            self._resolving.pop()

    def convert(self, schema: Schema, where: str) -> Schema:
        if "$ref" in schema:
            ref = str(schema["$ref"])
            if not ref.startswith(_DEFS_PREFIX):
                raise ValueError(f"{where}: unsupported $ref {ref}")
            return self.definition(ref.removeprefix(_DEFS_PREFIX))
        unknown = (
            set(schema)
            - _DROPPED_KEYS
            - {"type", "enum", "properties", "items", "additionalProperties", "required", *_COPIED_KEYS}
        )
        if unknown:
            raise ValueError(f"{where}: no CRD equivalent for {sorted(unknown)}")
        out: Schema = {"type": _single_type(schema, where)}
        out.update((key, schema[key]) for key in _COPIED_KEYS if key in schema)
        if "enum" in schema:
            out["enum"] = [value for value in schema["enum"] if value is not None]
        if "properties" in schema:
            out["properties"] = {
                name: self.convert(prop, f"{where}.{name}") for name, prop in sorted(schema["properties"].items())
            }
        if "required" in schema:
            out["required"] = list(schema["required"])
        if "items" in schema:
            out["items"] = self.convert(schema["items"], f"{where}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            out["additionalProperties"] = self.convert(schema["additionalProperties"], f"{where}{{}}")
        if out["type"] == "object" and "properties" not in out and "additionalProperties" not in out:
            # Free-form JSON (opaque driver parameters): a structural schema would prune all of it.
            out["x-kubernetes-preserve-unknown-fields"] = True
        if out.get("x-kubernetes-list-type") == "map":
            _relax_list_map(out)
        return out


def _single_type(schema: Schema, where: str) -> str:
    # A CRD cannot say "string or null"; a null sent for a non-nullable field is pruned, which is what clients expect.
    types = schema.get("type")
    names = [t for t in types if t != "null"] if isinstance(types, list) else [types]
    if len(names) != 1 or not isinstance(names[0], str):
        raise ValueError(f"{where}: cannot express type {types!r} in a CRD")
    return names[0]


def _relax_list_map(schema: Schema) -> None:
    # A CRD list-map key must be required or defaulted, but the built-in types key some lists on optional fields
    # (ResourceClaimStatus.devices on shareID). Such lists become atomic: only server-side apply merges differ.
    required = set(schema["items"].get("required", []))
    if not set(schema.get("x-kubernetes-list-map-keys", [])) <= required:
        schema["x-kubernetes-list-type"] = "atomic"
        del schema["x-kubernetes-list-map-keys"]


def schema_definitions(kubernetes_version: str) -> dict[str, Schema]:
    path = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{kubernetes_version}-local"
        / "_definitions.json"
    )
    if not path.is_file():
        raise FileNotFoundError(f"kubernetes-validate has no schema for Kubernetes {kubernetes_version} ({path})")
    definitions: dict[str, Schema] = json.loads(path.read_text())["$defs"]
    return definitions


def crd(resource: Resource, converter: SchemaConverter) -> Schema:
    top = converter.definition(f"io.k8s.api.resource.{VERSION}.{resource.kind}")
    # The server owns metadata's schema; a CRD may only say it is an object.
    top["properties"]["metadata"] = {"type": "object"}
    for field in ("apiVersion", "kind"):
        top["properties"][field].pop("enum", None)
    version: Schema = {"name": VERSION, "served": True, "storage": True, "schema": {"openAPIV3Schema": top}}
    if resource.status:
        version["subresources"] = {"status": {}}
    if resource.selectable_fields:
        version["selectableFields"] = [{"jsonPath": path} for path in resource.selectable_fields]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{resource.plural}.{GROUP}",
            # *.k8s.io groups are protected: a CRD must say whether the API was approved. "unapproved, ..." is
            # accepted (with a condition saying so), and honest for a test-only copy of built-in types.
            "annotations": {
                "api-approved.kubernetes.io": "unapproved, test-only copy of the built-in resource.k8s.io/v1"
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced" if resource.namespaced else "Cluster",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.kind.lower(),
            },
            "versions": [version],
        },
    }


def render_all(kubernetes_version: str = KUBERNETES_VERSION) -> dict[str, str]:
    """File name under crds/ -> YAML text, for every resource."""
    converter = SchemaConverter(schema_definitions(kubernetes_version))
    header = (
        f"# Generated by hack/testenv/apiserver/gen_crds.py from kubernetes-validate's Kubernetes {kubernetes_version}"
        " schema. Do not edit.\n"
    )
    return {
        f"{resource.plural}.{GROUP}.yaml": header + yaml.safe_dump(crd(resource, converter), sort_keys=False)
        for resource in RESOURCES
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether crds/ is up to date")
    args = parser.parse_args(argv)
    rendered = render_all()
    stale = sorted(
        name
        for name, text in rendered.items()
        if not (CRD_DIR / name).is_file() or (CRD_DIR / name).read_text() != text
    )
    extra = sorted(p.name for p in CRD_DIR.glob("*.yaml") if p.name not in rendered) if CRD_DIR.is_dir() else []
    if args.check:
        for name in stale + extra:
            print(f"{CRD_DIR / name} is stale: run {Path(__file__).name}", file=sys.stderr)
        return 1 if stale or extra else 0
    CRD_DIR.mkdir(exist_ok=True)
    for name in stale:
        (CRD_DIR / name).write_text(rendered[name])
    for name in extra:
        (CRD_DIR / name).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
