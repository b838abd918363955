"""Shared test helpers: tiny experiment configs that train in seconds on a CPU, and an
S3 API server (moto) on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from forgeml.config import ExperimentConfig, config_from_dict
from forgeml.runtime import free_port

REPO = Path(__file__).resolve().parents[1]

#: Credentials of the S3 API server below; in the environment of every process that
#: reads or writes an s3:// storage root in the tests.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "forgeml-test",
    "AWS_SECRET_ACCESS_KEY": "forgeml-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}

#: The files every registered model version holds (DESIGN.md's model package).
PACKAGE_FILES = {
    "config.yaml",
    "preprocessor.json",
    "model.pt",
    "metrics.json",
    "reference.json",
    "MODEL_CARD.md",
    "evaluation.npz",
    "report.html",
}


def tiny_raw_config(storage_root: str | Path, **sections) -> dict:
    """A raw (YAML-shaped) config: 16x16 maps, 30 per class, a 2-block CNN, 2 epochs."""
    raw = {
        "name": "tiny-wafer",
        "seed": 7,
        "storage": {"root": str(storage_root)},
        "data": {
            "source": {"kind": "wafer", "samples_per_class": 30, "image_size": 16, "shards": 4}
        },
        "model": {"kind": "cnn", "width": 4, "depth": 2, "dropout": 0.0},
        "train": {
            "max_epochs": 2,
            "batch_size": 32,
            "max_failures": 1,
            "early_stopping": {"metric": "val_loss", "mode": "min", "patience": 10},
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def tiny_config(storage_root: str | Path, **sections) -> ExperimentConfig:
    return config_from_dict(tiny_raw_config(storage_root, **sections))


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """How ``make test``'s pytest-xdist workers share the suite (pytest-xdist only).

    The integration tests are one unit of work: they share one embedded Ray runtime,
    which a second worker would start again. Each e2e module is a unit of its own: it
    starts its own ``ray start`` clusters, with their own temporary folders and ports, so
    it can run beside the shared runtime, and its module-scoped cluster stays on one
    worker. The unit tests need no runtime and are a unit too. Units go out in collection
    order, two to each worker first: the unit tests and the first e2e module to one, the
    shared runtime's (the longest) and the next e2e module to the other; the other e2e
    modules then go to whichever is free, so both workers end at about the same time.
    """
    from xdist.scheduler import LoadScopeScheduling

    class SharedRuntimeAndClusterModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module.startswith("tests/e2e/"):
                return module
            return "unit" if module.startswith("tests/unit/") else "shared-runtime"

    config.option.loadscopereorder = False
    return SharedRuntimeAndClusterModules(config, log)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty local storage root."""
    root = tmp_path / "store"
    root.mkdir()
    return root


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
