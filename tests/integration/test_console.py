"""The console of a real small training run through the CLI: forgeml's lines and Ray's
warnings, Ray's info logs only in the run's log file unless ``--verbose``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ray
from forgeml.console import LOG_FILE, VERBOSE_ENV

from tests.conftest import REPO, tiny_raw_config, write_config

#: What Ray prints at info level during a run: Ray Data's execution plans (driver and
#: workers) and Ray Train's report of every checkpoint.
RAY_INFO_LINES = ("Execution plan of Dataset", "Starting execution of Dataset", "TrainingReport(")


def _train(config: Path, *flags: str) -> str:
    """The console (stdout and stderr) of ``jobs/train.py`` on the shared runtime."""
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    return console


def test_the_console_shows_forgeml_lines_and_keeps_rays_info_logs_in_the_run_log(
    ray_runtime, store, tmp_path
):
    config = write_config(tmp_path / "tiny.yaml", tiny_raw_config(store))

    console = _train(config)

    assert "tiny-wafer: classification with a cnn model on wafer data" in console
    assert "data: train " in console
    assert "epoch 1/2  train_loss" in console and "epoch 2/2  train_loss" in console
    assert "test: accuracy " in console
    assert f"registered tiny-wafer:v1 at {store}/models/tiny-wafer/v1" in console
    for line in RAY_INFO_LINES:
        assert line not in console
    assert "Progress bars disabled" not in console
    (log,) = store.glob(f"runs/*/{LOG_FILE}")
    assert f"full log: {log}" in console
    kept = log.read_text()
    assert "Execution plan of Dataset" in kept  # the driver's Ray info logs
    assert "epoch 2/2  train_loss" in kept  # a line a worker sent
    assert "registered tiny-wafer:v1" in kept


def test_verbose_brings_rays_info_logs_back_to_the_console(ray_runtime, store, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", tiny_raw_config(store))

    console = _train(config, "--verbose")

    assert "epoch 2/2  train_loss" in console
    for line in RAY_INFO_LINES:
        assert line in console
