"""Writes forgeml/values.schema.json, the JSON Schema Helm checks the chart's values with.

Generated because JSON Schema cannot compare two values: ``minReplicas <= replicas <=
maxReplicas`` is spelled out as one implication per count ("replicas >= k implies
maxReplicas >= k"), up to MAX_REPLICAS pods per worker group. A unit test keeps the
file equal to this script's output.

    python helm/values_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_FILE = Path(__file__).parent / "forgeml" / "values.schema.json"
MAX_REPLICAS = 100

QUANTITY = {
    "oneOf": [
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"},
        {"type": "number", "minimum": 0},
    ]
}
RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "required": ["requests", "limits"],
    "properties": {
        part: {"type": "object", "required": ["cpu", "memory"], "additionalProperties": QUANTITY}
        for part in ("requests", "limits")
    },
}
OBJECTS = {"type": "array", "items": {"type": "object"}}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
REPLICAS = {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS}
SERVICE_TYPE = {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}


def section(properties: dict, required: list[str] | None = None, **extra) -> dict:
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    return {**schema, **({"required": required} if required else {}), **extra}


def ordered(low: str, high: str) -> list[dict]:
    """``low <= high`` for integers in [0, MAX_REPLICAS], one implication per value."""
    return [
        {
            "if": {"properties": {low: {"minimum": k}}, "required": [low]},
            "then": {"properties": {high: {"minimum": k}}},
        }
        for k in range(1, MAX_REPLICAS + 1)
    ]


def worker_group(gpu: bool) -> dict:
    properties = {
        "enabled": {"type": "boolean"},
        "replicas": REPLICAS,
        "minReplicas": REPLICAS,
        "maxReplicas": REPLICAS,
        "resources": RESOURCES,
        "rayTmpSizeLimit": QUANTITY,
        "rayLabels": STRINGS,
        "nodeSelector": STRINGS,
        "tolerations": OBJECTS,
        "affinity": {"type": "object"},
    }
    if gpu:
        properties["gpusPerWorker"] = {"type": "integer", "minimum": 1}
    return section(
        properties,
        required=list(properties),
        allOf=ordered("minReplicas", "replicas") + ordered("replicas", "maxReplicas"),
    )


def schema() -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "forgeml chart values",
        **section(
            {
                "image": section(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": {"type": "string", "minLength": 1, "not": {"const": "latest"}},
                        "digest": {"type": "string", "pattern": "^(sha256:[0-9a-f]{64})?$"},
                        "pullPolicy": {"enum": ["IfNotPresent", "Always", "Never"]},
                    },
                    required=["repository", "tag", "pullPolicy"],
                ),
                "imagePullSecrets": {
                    "type": "array",
                    "items": section({"name": {"type": "string"}}, required=["name"]),
                },
                "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
                "auth": section(
                    {
                        "enabled": {"type": "boolean"},
                        "existingSecret": {"type": "string", "minLength": 1},
                    },
                    required=["enabled", "existingSecret"],
                ),
                "s3": section(
                    {
                        "endpointUrl": {"type": "string", "pattern": "^(https?://.+)?$"},
                        "region": {"type": "string"},
                        "credentialsSecret": {"type": "string"},
                    }
                ),
                "serviceAccount": section(
                    {
                        "create": {"type": "boolean"},
                        "name": {"type": "string"},
                        "annotations": STRINGS,
                    }
                ),
                "env": {
                    **STRINGS,
                    "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                },
                "head": section(
                    {
                        "numCpus": {"type": "integer", "minimum": 0},
                        "resources": RESOURCES,
                        "rayTmpSizeLimit": QUANTITY,
                        "nodeSelector": STRINGS,
                        "tolerations": OBJECTS,
                        "affinity": {"type": "object"},
                        "serviceType": SERVICE_TYPE,
                    }
                ),
                "workers": section(
                    {"cpu": worker_group(gpu=False), "gpu": worker_group(gpu=True)},
                    required=["cpu", "gpu"],
                ),
                "autoscaling": section(
                    {
                        "enabled": {"type": "boolean"},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "upscalingMode": {"enum": ["Conservative", "Default", "Aggressive"]},
                        "version": {"enum": ["v1", "v2"]},
                        "resources": RESOURCES,
                    }
                ),
                "cluster": section({"enabled": {"type": "boolean"}}),
                "job": section(
                    {
                        "enabled": {"type": "boolean"},
                        "entrypoint": {"type": "string", "minLength": 1},
                        "experiment": {"type": ["object", "string"]},
                        "useClusterSelector": {"type": "boolean"},
                        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "SidecarMode"]},
                        "shutdownAfterJobFinishes": {"type": "boolean"},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
                        "submitter": section({"resources": RESOURCES}),
                    }
                ),
                "retrain": section({"enabled": {"type": "boolean"}}),
                "serving": section(
                    {
                        "enabled": {"type": "boolean"},
                        "serveConfigV2": {"type": "string"},
                        "tokenSecret": {"type": "string"},
                        "upgradeStrategy": {"enum": ["NewCluster", "None"]},
                        "service": section(
                            {
                                "type": SERVICE_TYPE,
                                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                            }
                        ),
                    }
                ),
                "networkPolicy": section(
                    {
                        "enabled": {"type": "boolean"},
                        "servingFrom": OBJECTS,
                        "operatorPodLabels": STRINGS,
                        "metricsFrom": OBJECTS,
                    }
                ),
                "metrics": section(
                    {
                        "podMonitor": section(
                            {
                                "enabled": {"type": "boolean"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "labels": STRINGS,
                            }
                        )
                    }
                ),
                "commonLabels": STRINGS,
            }
        ),
    }


def render() -> str:
    return json.dumps(schema(), indent=1) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(render())
