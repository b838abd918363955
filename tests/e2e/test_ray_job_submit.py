"""`ray start --head` with token authentication, `ray job submit` of jobs/train.py,
`forgeml serve deploy` of the model it registered onto the same cluster, a drift alarm
of jobs/monitor.py that submits its retraining there, and the Helm chart's RayService
for that model."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import requests
import torch
from forgeml.config import StorageConfig, TrafficConfig
from forgeml.console import LOG_FILE
from forgeml.local_cluster import LocalCluster, free_port
from forgeml.model_package import load_model
from forgeml.monitor.check import check
from forgeml.monitor.traffic import TrafficRecorder
from forgeml.runtime import RAY_ENV_DEFAULTS
from forgeml.storage import ModelRegistry, Storage
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.conftest import tiny_raw_config, write_config
from tests.e2e.drifted import appended_maps, drifted_maps
from tests.e2e.jobs import RAY_INFO_LINES, submit

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A head node on 127.0.0.1 with RAY_AUTH_MODE=token and 4 CPUs, stopped when the
    module ends; forgeml's Ray settings are set where the node starts, as the README says."""
    ray.shutdown()  # the integration runtime, if this session started one
    with LocalCluster(
        tmp_path_factory.mktemp("cluster"), head_cpus=4, extra_env=RAY_ENV_DEFAULTS
    ) as cluster:
        yield cluster


@dataclass(frozen=True)
class SubmittedTraining:
    """The module's one `ray job submit` of jobs/train.py: the finished submission and the
    storage root it registered tiny-wafer:v1 in."""

    job: subprocess.CompletedProcess
    store: Path


@pytest.fixture(scope="module")
def submitted_training(token_cluster, tmp_path_factory) -> SubmittedTraining:
    """jobs/train.py of the tiny config, submitted once for every test of its model."""
    store = token_cluster.folder / "store"
    config = write_config(tmp_path_factory.mktemp("train") / "tiny.yaml", tiny_raw_config(store))
    job = submit(token_cluster, "train.py", "--config", str(config))
    return SubmittedTraining(job, store)


@pytest.fixture
def trained_store(submitted_training) -> Path:
    """The storage root of the submitted run: the tests that serve, monitor or package its
    model stop here, with the job's output, when the run failed."""
    job = submitted_training.job
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return submitted_training.store


def test_submitted_training_job_registers_its_model(submitted_training):
    job = submitted_training.job

    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "registered tiny-wafer:v1" in job.stdout
    registry = ModelRegistry(Storage(StorageConfig(root=str(submitted_training.store))))
    assert registry.versions("tiny-wafer") == [1]


def test_the_jobs_console_shows_forgeml_lines_and_keeps_rays_info_logs_in_the_run_log(
    submitted_training,
):
    """What `ray job submit` prints of the run is forgeml's lines and Ray's warnings;
    Ray's info logs go to the run's log file (tests/e2e/test_multinode.py submits a run
    with --verbose, which brings them back)."""
    store = submitted_training.store
    console = submitted_training.job.stdout + submitted_training.job.stderr

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


def test_serve_deploy_puts_the_registered_model_on_the_cluster(token_cluster, trained_store):
    """Deploy of the submitted run's model returns, and the cluster keeps serving."""
    token, port = secrets.token_hex(16), free_port()
    env = {
        **token_cluster.env,
        "RAY_ADDRESS": token_cluster.gcs_address,
        "FORGEML_SERVE_TOKEN": token,
    }
    command = [
        str(BIN / "forgeml"),
        "serve",
        "deploy",
        "--model",
        "tiny-wafer",
        "--storage-root",
        str(trained_store),
        "--port",
        str(port),
    ]
    deployed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert "serving tiny-wafer:v1" in deployed.stdout

    response = requests.post(
        f"http://127.0.0.1:{port}/v1/models/tiny-wafer/predict",
        json={"instances": [{"image": [[1] * 16] * 16}]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["version"] == "v1"


def test_a_drift_alarm_submits_one_retraining_job_to_the_cluster(
    token_cluster, trained_store, tmp_path
):
    """jobs/monitor.py as a job on the cluster: traffic of edge-ring maps, recorded for
    the submitted run's model as its replicas record it, raises an alarm, and the monitor
    submits a retraining job with new maps appended through the Jobs API, with the
    cluster's token (followed until it trains; tests/integration/test_training.py checks
    that appended rows are trained on). A later alarm on the same version submits nothing."""
    store = trained_store
    storage = Storage(StorageConfig(root=str(store)))
    loaded = load_model(ModelRegistry(storage), "tiny-wafer:v1")
    inputs = loaded.preprocessor.transform({"image": drifted_maps(360, seed=12)})["inputs"]
    with torch.inference_mode():
        predictions = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy()
    recorder = TrafficRecorder(storage, loaded.version, TrafficConfig())
    summaries = loaded.preprocessor.input_summary(inputs)
    recorder.record(summaries, loaded.task.drift_values(predictions))
    recorder.close()
    retrain = f"monitor.retrain={{submit_to: ray, append: ['{appended_maps(tmp_path / 'new')}']}}"
    arguments = ["--model", "tiny-wafer:v1", "--storage-root", str(store)]
    arguments += ["--set", "monitor.min_rows=300", "--set", retrain]

    monitored = submit(token_cluster, "monitor.py", *arguments)

    assert monitored.returncode == 0, monitored.stdout[-3000:] + monitored.stderr[-3000:]
    (line,) = [line for line in monitored.stdout.splitlines() if line.startswith('{"model"')]
    summary = json.loads(line)
    assert summary["status"] == "drift" and "input.defect_fraction" in summary["drifted"]
    job = summary["retrain"]["job"]
    token = token_cluster.env["RAY_AUTH_TOKEN"]
    client = JobSubmissionClient(
        token_cluster.dashboard_url, headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + 180
    while "training tiny-wafer as run" not in client.get_job_logs(job):
        status = client.get_job_status(job)
        assert status not in (JobStatus.FAILED, JobStatus.STOPPED), client.get_job_logs(job)[-3000:]
        assert time.monotonic() < deadline, "the retraining job did not start training"
        time.sleep(1)
    assert client.get_job_info(job).metadata == {"forgeml.retrain_of": "tiny-wafer:v1"}
    client.stop_job(job)

    again = check(storage, "tiny-wafer:v1", ["monitor.min_rows=300", retrain])
    assert again["alarm"]
    assert again["retrain"] == {"skipped": "already started", **summary["retrain"]}


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
        k: v for k, v in token_cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")
    }
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)

    job = submit(token_cluster, "train.py", "--config", str(config), env=env)

    assert job.returncode != 0
    assert refusal in job.stdout + job.stderr
    assert not store.exists()
