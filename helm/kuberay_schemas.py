"""Writes kuberay-schemas/, the JSON Schemas the chart tests check KubeRay objects with.

One schema per CRD (``raycluster-ray-v1.json`` for RayCluster, and so on): the ``v1``
version's ``openAPIV3Schema``, converted the way kubeconform's openapi2jsonschema does
with DENY_ROOT_ADDITIONAL_PROPERTIES. Field names, types, formats, enums, required
fields, ``items``, ``additionalProperties``, patterns and bounds stay;
``x-kubernetes-int-or-string`` becomes an integer-or-string ``anyOf`` and ``nullable`` a
``"null"`` type; descriptions, defaults, CEL rules and server-side apply's list and map
semantics go, which JSON Schema cannot check. An object that lists its properties, the
root included, refuses any other field, as the API server's strict field validation
does, unless the CRD gives ``additionalProperties`` or keeps unknown fields
(``x-kubernetes-preserve-unknown-fields``). A keyword not named here stops the script,
so a new KubeRay cannot drop a rule unnoticed.

The schemas are committed so the chart tests need nothing outside the repository. They
sit beside the chart, not in it, because ``helm package`` would ship them. The KubeRay
version is the chart's ``forgeml.dev/kuberay-operator`` annotation: the CRDs converted
must be that operator's. A test converts the CRDs again, when they are at hand, and
compares.

    python helm/kuberay_schemas.py CRD_FOLDER    # a folder of KubeRay CRD YAML files
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).parent
CHART = HERE / "forgeml"
SCHEMAS = HERE / "kuberay-schemas"
VERSION_ANNOTATION = "forgeml.dev/kuberay-operator"
JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"

#: Keywords JSON Schema checks as the API server does, copied unchanged.
KEPT = {
    "type",
    "format",
    "enum",
    "required",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
}
#: Prose, values the API server fills in, and rules JSON Schema cannot state: CEL
#: (``x-kubernetes-validations``) and how server-side apply merges lists and maps.
DROPPED = {
    "description",
    "default",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
#: Read by the conversion below, not copied.
HANDLED = {
    "properties",
    "items",
    "additionalProperties",
    "anyOf",
    "nullable",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
}


def kuberay_version() -> str:
    """The KubeRay operator version the chart is written for (Chart.yaml)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return chart["annotations"][VERSION_ANNOTATION]


def schema_file_name(kind: str) -> str:
    """The file holding ``kind``'s schema, named as kubeconform names its schemas."""
    return f"{kind.lower()}-ray-v1.json"


def structural(schema: dict, where: str = "") -> dict:
    """``schema`` (an OpenAPI v3 schema of a CRD) as a strict JSON Schema.

    Raises ValueError naming the field and keyword for a keyword it does not know."""
    unknown = set(schema) - KEPT - DROPPED - HANDLED
    if unknown:
        raise ValueError(f"{where or '/'}: no conversion for {sorted(unknown)}")
    converted = {key: value for key, value in schema.items() if key in KEPT}
    if schema.get("nullable"):
        converted["type"] = [schema["type"], "null"]
    if "properties" in schema:
        converted["properties"] = {
            name: structural(field, f"{where}/{name}")
            for name, field in schema["properties"].items()
        }
    if "items" in schema:
        converted["items"] = structural(schema["items"], f"{where}[]")
    if "anyOf" in schema:
        converted["anyOf"] = [structural(option, where) for option in schema["anyOf"]]
    if schema.get("x-kubernetes-int-or-string"):
        converted["anyOf"] = INT_OR_STRING
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        converted["additionalProperties"] = structural(extra, f"{where}/*")
    elif extra is not None:
        converted["additionalProperties"] = extra
    elif "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        converted["additionalProperties"] = False
    return converted


def schemas(crds: Path) -> dict[str, str]:
    """File name -> content: a schema per ``ray.io_*.yaml`` CRD in ``crds``, and the
    NOTICE that says where they come from."""
    version = kuberay_version()
    files = {}
    for path in sorted(crds.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        kind = crd["spec"]["names"]["kind"]
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = {
            "$schema": JSON_SCHEMA_DRAFT,
            "$comment": f"KubeRay v{version} {kind} ray.io/v1 from {path.name} (Apache-2.0),"
            " converted by helm/kuberay_schemas.py",
            **structural(v1["schema"]["openAPIV3Schema"]),
        }
        files[schema_file_name(kind)] = json.dumps(schema, indent=1, sort_keys=True) + "\n"
    if not files:
        raise FileNotFoundError(f"no ray.io_*.yaml CRD in {crds}")
    files["NOTICE"] = (
        f"The JSON Schemas in this folder are derived from the CustomResourceDefinitions of\n"
        f"KubeRay v{version} (https://github.com/ray-project/kuberay), licensed under the\n"
        "Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0).\n"
        "Changed by helm/kuberay_schemas.py: converted to JSON Schema, descriptions, defaults\n"
        "and CEL rules dropped, unknown fields refused.\n"
    )
    return files


def write(files: dict[str, str], folder: Path) -> None:
    """``files`` written to ``folder``, and any other file there removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in {path.name for path in folder.iterdir()} - set(files):
        (folder / stale).unlink()
    for name, text in files.items():
        (folder / name).write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crds", type=Path, help="a folder of KubeRay CRD YAML files")
    write(schemas(parser.parse_args().crds), SCHEMAS)
