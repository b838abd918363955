"""`ray job submit` of a script in jobs/, with the repository as working directory,
as users submit to a cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from forgeml.local_cluster import LocalCluster

from tests.conftest import REPO

RAY = Path(sys.executable).parent / "ray"

#: What Ray prints at info level during a run: Ray Data's execution plans (driver and
#: workers) and Ray Train's report of every checkpoint. A job's console shows them only
#: with ``--verbose``; its run log keeps them either way.
RAY_INFO_LINES = ("Execution plan of Dataset", "Starting execution of Dataset", "TrainingReport(")


def _command(
    cluster: LocalCluster, job: str, arguments: tuple[str, ...], env_vars: dict | None = None
) -> list[str]:
    """``env_vars``: set for the job's driver and every actor it starts (its runtime env)."""
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    return [
        *(str(RAY), "job", "submit", "--address", cluster.dashboard_url, *runtime_env),
        *("--working-dir", str(REPO), "--", "python", f"jobs/{job}", *arguments),
    ]


def submit(
    cluster: LocalCluster, job: str, *arguments: str, env: dict | None = None, timeout: int = 540
) -> subprocess.CompletedProcess:
    """Submit ``python jobs/<job> <arguments>`` and wait for it; ``env`` replaces the
    cluster's client environment (another token, say)."""
    return subprocess.run(
        _command(cluster, job, arguments),
        env=env or cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class BackgroundJob:
    """A submission left running while a test acts on the cluster."""

    def __init__(
        self,
        cluster: LocalCluster,
        folder: Path,
        job: str,
        *arguments: str,
        env_vars: dict | None = None,
    ):
        self.log = folder / "job.log"
        self.process = subprocess.Popen(
            _command(cluster, job, arguments, env_vars),
            env=cluster.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def finish(self, timeout: float = 540) -> tuple[int, str]:
        """Its exit status and output, once it ends."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return code, self.log.read_text()
