"""The repo's Helm chart rendered by the real helm binary (installed by `make tools`)."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import REPO

HELM = REPO / ".tools" / "helm"
CHART = REPO / "helm" / "forgeml"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert HELM.exists(), "helm is missing: run `make tools`"
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, check=check, timeout=120
    )


def render(*args: str) -> list[dict]:
    """The objects `helm template` renders for these arguments."""
    output = helm("template", "forge", str(CHART), *args).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]
