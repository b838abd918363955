"""`ray job submit` of a script in jobs/, with the repository as working directory,
as users submit to a cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from forgeml.local_cluster import LocalCluster

from tests.conftest import REPO

RAY = Path(sys.executable).parent / "ray"


def submit(
    cluster: LocalCluster, job: str, *arguments: str, env: dict | None = None, timeout: int = 540
) -> subprocess.CompletedProcess:
    """Submit ``python jobs/<job> <arguments>`` and wait for it; ``env`` replaces the
    cluster's client environment (another token, say)."""
    command = [str(RAY), "job", "submit", "--address", cluster.dashboard_url]
    command += ["--working-dir", str(REPO), "--", "python", f"jobs/{job}", *arguments]
    return subprocess.run(
        command, env=env or cluster.env, capture_output=True, text=True, timeout=timeout
    )
