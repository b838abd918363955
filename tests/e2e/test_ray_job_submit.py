"""`ray start --head` with token authentication, then `ray job submit` of jobs/train.py."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from forgeml.config import StorageConfig
from forgeml.storage import ModelRegistry, Storage

from tests.conftest import REPO, free_port, tiny_raw_config, write_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A head node on 127.0.0.1 with RAY_AUTH_MODE=token, stopped when the module ends.

    `ray start --block` owns every process of the node, so terminating it stops exactly
    this cluster and leaves any other Ray on the machine alone.
    """
    ray.shutdown()  # the integration runtime, if this session started one
    home = tmp_path_factory.mktemp("home")
    token = secrets.token_hex(32)
    dashboard_port = free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    log = home / "ray-start.log"
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=4",
        ],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while True:
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address],
            env=env,
            capture_output=True,
            timeout=60,
        )
        if probe.returncode == 0:
            break
        if head.poll() is not None or time.monotonic() > deadline:
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError(f"ray start failed:\n{log.read_text()}\n{probe.stderr.decode()}")
        time.sleep(1)
    yield {"address": address, "env": env, "home": home}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _submit(cluster, env, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster["address"],
            "--working-dir",
            str(REPO),
            *extra,
            "--",
            "python",
            "jobs/train.py",
            "--config",
            str(config),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )


def test_submitted_training_job_registers_its_model(token_cluster, tmp_path):
    store = tmp_path / "store"
    config = write_config(tmp_path / "tiny.yaml", tiny_raw_config(store))

    job = _submit(token_cluster, token_cluster["env"], config)

    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "registered tiny-wafer:v1" in job.stdout
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    assert registry.versions("tiny-wafer") == [1]


@pytest.mark.parametrize(
    ("token", "refusal"),
    [
        (None, "Unauthorized: Missing authentication token"),
        ("0" * 64, "Forbidden: Invalid authentication token"),
    ],
)
def test_the_cluster_refuses_submissions_without_the_right_token(
    token_cluster, tmp_path, token, refusal
):
    store = tmp_path / "store"
    config = write_config(tmp_path / "tiny.yaml", tiny_raw_config(store))
    env = {
        k: v
        for k, v in token_cluster["env"].items()
        if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")
    }
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)

    job = _submit(token_cluster, env, config)

    assert job.returncode != 0
    assert refusal in job.stdout + job.stderr
    assert not store.exists()
