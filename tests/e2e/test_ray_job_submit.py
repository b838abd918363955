"""`ray start --head` with token authentication, `ray job submit` of jobs/train.py for a
classifier and a CartPole policy, `forgeml serve deploy` of both onto the same cluster
(an episode driven through /act), and a drift alarm of jobs/monitor.py that submits its
retraining there."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import ray
import requests
import torch
from forgeml.config import StorageConfig, TrafficConfig
from forgeml.console import LOG_FILE
from forgeml.local_cluster import LocalCluster
from forgeml.model_package import load_model
from forgeml.monitor.check import check
from forgeml.monitor.traffic import TrafficRecorder
from forgeml.rl.package import load_policy
from forgeml.rl.policy import Policy
from forgeml.runtime import RAY_ENV_DEFAULTS, free_port
from forgeml.storage import ModelRegistry, Storage
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.conftest import REPO, tiny_raw_config, write_config
from tests.e2e.drifted import appended_maps, drifted_maps
from tests.e2e.jobs import RAY_INFO_LINES, BackgroundJob, submit

BIN = Path(sys.executable).parent
CARTPOLE = REPO / "examples" / "cartpole" / "config.yaml"


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
    """The module's two `ray job submit`s of jobs/train.py, side by side on the cluster:
    the tiny classifier's finished submission, the exit status and output of the
    CartPole policy's (two iterations), and the storage root both registered in."""

    job: subprocess.CompletedProcess
    policy: tuple[int, str]
    store: Path


@pytest.fixture(scope="module")
def submitted_training(token_cluster, tmp_path_factory) -> SubmittedTraining:
    """Both runs, submitted once for every test of their models."""
    store = token_cluster.folder / "store"
    folder = tmp_path_factory.mktemp("train")
    overrides = [
        f"storage.root={store}",
        "task.max_iterations=2",
        "task.target_return=null",
        "task.evaluation_episodes=10",
    ]
    arguments = [arg for override in overrides for arg in ("--set", override)]
    policy = BackgroundJob(token_cluster, folder, "train.py", "--config", str(CARTPOLE), *arguments)
    config = write_config(folder / "tiny.yaml", tiny_raw_config(store, tracking={"mlflow": {}}))
    job = submit(token_cluster, "train.py", "--config", str(config))
    return SubmittedTraining(job, policy.finish(), store)


@pytest.fixture(scope="module")
def serving_token() -> str:
    """The bearer token the module's serving deployment requires."""
    return secrets.token_hex(16)


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
    (log,) = store.glob(f"runs/tiny-wafer-*/{LOG_FILE}")  # the policy runs here too
    assert f"full log: {log}" in console
    kept = log.read_text()
    assert "Execution plan of Dataset" in kept  # the driver's Ray info logs
    assert "epoch 2/2  train_loss" in kept  # a line a worker sent
    assert "registered tiny-wafer:v1" in kept


def _episode_returns(act, seeds: range) -> list[float]:
    """CartPole's return of an episode from each seed, acting with ``act``."""
    env = gymnasium.make("CartPole-v1")
    returns = []
    for seed in seeds:
        observation, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            observation, reward, terminated, truncated, _ = env.step(act(observation))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


def test_serve_deploy_puts_the_registered_model_and_policy_on_the_cluster(
    token_cluster, trained_store, submitted_training, serving_token
):
    """Deploy of the submitted runs' classifier and policy returns, and the cluster keeps
    serving both: a prediction, and CartPole episodes driven through /act to a higher
    return than the untrained policy reaches on the same seeds."""
    code, output = submitted_training.policy
    assert code == 0, output[-3000:]
    assert "registered cartpole-ppo:v1" in output
    token, port = serving_token, free_port()
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
        "--model",
        "cartpole-ppo",
        "--storage-root",
        str(trained_store),
        "--port",
        str(port),
    ]
    deployed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert "serving tiny-wafer:v1, cartpole-ppo:v1 at" in deployed.stdout
    models = f"http://127.0.0.1:{port}/v1/models"
    headers = {"Authorization": f"Bearer {token}"}

    def post(path: str, body: dict) -> requests.Response:
        return requests.post(f"{models}/{path}", json=body, headers=headers, timeout=60)

    response = post("tiny-wafer/predict", {"instances": [{"image": [[1] * 16] * 16}]})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == "v1"

    def act(observation) -> int:
        response = post("cartpole-ppo/act", {"observations": [observation.tolist()]})
        assert response.status_code == 200, response.text
        acted = response.json()
        assert len(acted["probabilities"][0]) == 2 and acted["q_values"] is None
        return acted["actions"][0]

    registry = ModelRegistry(Storage(StorageConfig(root=str(trained_store))))
    trained, _ = load_policy(registry, "cartpole-ppo")
    untrained = Policy.build(trained.cfg, trained.observation_space, trained.action_space)
    served = _episode_returns(act, range(3))
    print(json.dumps({"served": served}))
    assert served == _episode_returns(lambda o: trained.act(o[None])["actions"][0], range(3))
    assert np.mean(served) > np.mean(
        _episode_returns(lambda o: untrained.act(o[None])["actions"][0], range(3))
    )

    wrong = post("cartpole-ppo/act", {"observations": [[0.0, 0.0, 0.0]]})
    assert wrong.status_code == 422
    assert "an observation of CartPole-v1 has 4 values, not 3" in wrong.json()["error"]["message"]
    assert post("cartpole-ppo/predict", {"instances": [{"x": 1.0}]}).status_code == 404
    refused = post("tiny-wafer/act", {"observations": [[0.0] * 4]})
    assert refused.status_code == 404
    assert "POST /v1/models/tiny-wafer/predict" in refused.json()["error"]["message"]
    guessed = secrets.token_hex(16)
    unknown = requests.post(
        f"{models}/tiny-wafer/predict",
        json={"instances": [{"image": [[1] * 16] * 16}]},
        headers={"Authorization": f"Bearer {guessed}"},
        timeout=60,
    )
    assert unknown.status_code == 401 and guessed not in unknown.text


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


def test_no_file_the_cluster_runs_leave_holds_a_secret(token_cluster, trained_store, serving_token):
    """The module's last test: every file of the cluster (each node's logs, the jobs'
    logs, the session's files), the storage root (run logs and records, TensorBoard,
    MLflow, the packages with their reports and model cards, recorded traffic) and the
    nodes' home, after training, serving, monitoring and refused submissions, is free
    of the cluster's Ray token and the serving token."""
    assert (trained_store / "mlflow.db").is_file()
    used = {"Ray token": token_cluster.env["RAY_AUTH_TOKEN"], "serving token": serving_token}
    folders = [token_cluster.folder, *(node.temp_dir for node in token_cluster.nodes.values())]
    swept, found = 0, []
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            swept += 1
            found += [(what, str(path)) for what, secret in used.items() if secret.encode() in data]
    assert swept > 100 and any(trained_store in p.parents for p in token_cluster.folder.rglob("*"))
    assert found == [], found
