"""Writes the plain manifests in this folder from the Helm chart, for users without Helm.

Renders ``helm/forgeml`` with ``values.yaml`` as release ``forgeml`` and writes one file
per kind, without Helm's own labels. A test renders them again and compares, so they
stay the chart's defaults.

    python deploy/k8s/generate.py      # after `make tools`
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).parent
REPO = HERE.parents[1]
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
HEADER = "# Generated from the Helm chart by deploy/k8s/generate.py; edit the chart and rerun.\n"


class _BlockStrings(yaml.SafeDumper):
    """Writes multi-line strings (the experiment, serveConfigV2) as literal blocks."""


_BlockStrings.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def _without_helm_labels(node):
    if isinstance(node, dict):
        return {
            key: _without_helm_labels(value)
            for key, value in node.items()
            if key not in HELM_LABELS
        }
    if isinstance(node, list):
        return [_without_helm_labels(item) for item in node]
    return node


def manifests() -> dict[str, str]:
    """File name -> content, one file per kind."""
    rendered = subprocess.run(
        [
            str(REPO / ".tools" / "helm"),
            "template",
            "forgeml",
            str(REPO / "helm" / "forgeml"),
            "--values",
            str(HERE / "values.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files: dict[str, list[dict]] = {}
    for doc in yaml.safe_load_all(rendered):
        if doc:
            files.setdefault(f"{doc['kind'].lower()}.yaml", []).append(_without_helm_labels(doc))
    return {
        name: HEADER + yaml.dump_all(docs, Dumper=_BlockStrings, sort_keys=False, width=100)
        for name, docs in sorted(files.items())
    }


if __name__ == "__main__":
    for name, text in manifests().items():
        (HERE / name).write_text(text)
