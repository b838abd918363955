"""One local Ray runtime for the whole session, and an S3 API server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from forgeml.runtime import RAY_ENV_DEFAULTS, forget_stale_cluster

from tests.conftest import free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "forgeml-test",
    "AWS_SECRET_ACCESS_KEY": "forgeml-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def ray_runtime():
    """The shared runtime. Four logical CPUs on two cores leave a slot for Ray Data
    beside two single-CPU training workers. S3 test credentials and forgeml's Ray
    settings are in the environment before Ray starts so that every worker inherits them."""
    saved = {key: os.environ.get(key) for key in {**S3_ENV, **RAY_ENV_DEFAULTS}}
    os.environ.update({**RAY_ENV_DEFAULTS, **S3_ENV})
    # The dashboard serves the State API, which Ray Train's placement-group cleaner
    # queries to free the workers of a trial that Tune stopped.
    forget_stale_cluster()
    ray.init(address="local", num_cpus=4, include_dashboard=True, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1; stopped at the end of the session."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("moto")) / "moto.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)
