"""Hyperparameter search on the shared runtime: ASHA prunes, results and the best model
are written, the best config reproduces its metric, and an interrupted search resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
from forgeml.config import config_from_dict, load_config
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.trainer import run_training
from forgeml.tune.search import BEST_CONFIG_FILE, RESULTS_FILE, run_tuning

from tests.conftest import REPO, tiny_raw_config, write_config
from tests.integration.tracked import mlflow_client, mlflow_runs, tensorboard_scalars

#: Two learning rates that learn and two that cannot: after one epoch ASHA sees the
#: difference, and the grid order (good ones first) makes the pruning deterministic.
LEARNING_RATES = [1e-2, 3e-3, 1e-7, 1e-6]


def _raw(store: Path | str, **tune) -> dict:
    return tiny_raw_config(
        store,
        train={"max_epochs": 3, "schedule": {"kind": "constant"}},
        tune={
            "metric": "val_loss",
            "mode": "min",
            "max_concurrent_trials": 2,
            "search": {"kind": "grid"},
            "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
            "space": {"train.optimizer.lr": {"kind": "grid", "values": LEARNING_RATES}},
            **tune,
        },
    )


@pytest.fixture(scope="module")
def searched(ray_runtime, tmp_path_factory):
    raw = _raw(tmp_path_factory.mktemp("tune-store"))
    raw["tracking"] = {"mlflow": {}}
    cfg = config_from_dict(raw)
    return cfg, run_tuning(cfg)


def test_asha_prunes_poor_trials_and_the_best_is_registered(searched):
    cfg, outcome = searched
    trials = pd.read_parquet(f"{outcome.uri}/{RESULTS_FILE}")
    assert len(trials) == 4
    assert {
        "trial_id",
        "param.train.optimizer.lr",
        "val_loss",
        "epochs",
        "seconds",
        "state",
    } <= set(trials.columns)
    pruned = trials[trials["state"] == "pruned"]
    assert len(pruned) >= 1 and (pruned["epochs"] < 3).all()
    assert outcome.best_params["train.optimizer.lr"] in LEARNING_RATES[:2]
    assert outcome.summary["trials"] == 4 and outcome.summary["cpu_seconds"] > 0

    registry = ModelRegistry(Storage(cfg.storage))
    assert outcome.version.ref == "tiny-wafer:v1"
    metrics = json.loads(registry.read(outcome.version, "metrics.json"))
    assert metrics["status"] == "tuned" and metrics["run"]["name"] == outcome.experiment
    assert metrics["test"]["accuracy"] > 0


def test_every_trial_is_tracked_and_the_best_holds_the_package(searched):
    cfg, outcome = searched
    store = Path(cfg.storage.root)
    runs = {run.info.run_name: run for run in mlflow_runs(store, "tiny-wafer")}
    trial_ids = set(outcome.trials["trial_id"])
    assert set(runs) == trial_ids
    for trial_id, run in runs.items():
        assert run.data.tags["forgeml.tune_experiment"] == outcome.experiment
        lr = outcome.trials.set_index("trial_id").loc[trial_id, "param.train.optimizer.lr"]
        assert float(run.data.params["train.optimizer.lr"]) == pytest.approx(lr)
        trial = outcome.trials.set_index("trial_id").loc[trial_id]
        # TensorBoard: Tune's own logger, one point per reported epoch, in the trial folder
        steps = [step for step, _ in tensorboard_scalars(Path(trial["path"]))["ray/tune/val_loss"]]
        assert steps == list(range(1, trial["epochs"] + 1))
        # MLflow: every epoch the workers trained (a pruned trial's may go on for one
        # after ASHA stopped it); no run is left open, a pruned one is closed as killed
        # unless its workers had finished anyway
        history = mlflow_client(store).get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history][: trial["epochs"]] == steps
        done = {"FINISHED", "KILLED"} if trial["state"] == "pruned" else {"FINISHED"}
        assert run.info.status in done
    best = [run for run in runs.values() if "forgeml.model_version" in run.data.tags]
    assert [run.data.tags["forgeml.model_version"] for run in best] == [outcome.version.ref]
    assert best[0].data.metrics["test/accuracy"] > 0


def test_the_best_config_trains_to_the_reported_metric(searched, tmp_path):
    """Retrained under a storage root of its own: the search's store keeps only what the
    search registered and tracked, which the other tests here read."""
    _, outcome = searched
    best = load_config(Path(outcome.uri) / BEST_CONFIG_FILE, [f"storage.root={tmp_path / 'store'}"])
    assert best.tune is None
    assert best.train.optimizer.lr == outcome.best_params["train.optimizer.lr"]

    retrained = run_training(best)

    # A rerun: the same seed gives the same initial weights and, on one worker with cached
    # splits, the same row order every epoch, so the retrained config retraces its trial.
    best_val_loss = min(epoch["val_loss"] for epoch in retrained.metrics["history"])
    assert best_val_loss == pytest.approx(outcome.best_metric, rel=1e-4)
    stuck = outcome.trials[outcome.trials["param.train.optimizer.lr"] <= 1e-6]
    assert best_val_loss < stuck["val_loss"].min() - 0.1


def _trial_epochs(experiment: Path) -> dict[str, int]:
    """Lines of result.json (one per reported epoch) for each trial directory."""
    return {
        trial.name.split("_")[3]: len((trial / "result.json").read_text().splitlines())
        for trial in experiment.glob("run_trial_*")
        if (trial / "result.json").exists()
    }


def test_an_interrupted_search_resumes_and_runs_only_the_missing_trials(ray_runtime, tmp_path):
    """The driver is killed once the first trial has finished, while the second (of many
    more epochs) trains; --resume finishes the rest without running that trial again.
    In-process trials: the search, not Ray Train, is what resumes here."""
    store = tmp_path / "store"
    raw = _raw(
        store,
        max_concurrent_trials=1,
        scheduler={"kind": "none"},
        trial_mode="in_process",
        space={"train.max_epochs": {"kind": "grid", "values": [2, 20]}},
    )
    raw["train"]["early_stopping"] = {"enabled": False}
    config = write_config(tmp_path / "tune.yaml", raw)
    command = [sys.executable, str(REPO / "jobs" / "tune.py"), "--config", str(config)]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    first = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            experiments = list((store / "tune").glob("tiny-wafer-tune-*"))
            if experiments:
                done = _trial_epochs(experiments[0])
                states = "".join(p.read_text() for p in experiments[0].glob("experiment_state-*"))
                if done.get("00000") == 2 and "TERMINATED" in states.replace("\\", ""):
                    break
            assert first.poll() is None, "the search ended before it could be interrupted"
            assert time.monotonic() < deadline, "the first trial did not finish"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    experiment = experiments[0]
    assert not (experiment / RESULTS_FILE).exists()

    resumed = subprocess.run(
        [*command, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=540
    )

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "search: 2 trials (grid, none)" in resumed.stdout
    trials = pd.read_parquet(experiment / RESULTS_FILE)
    assert len(trials) == 2 and set(trials["state"]) == {"completed"}
    assert _trial_epochs(experiment) == {"00000": 2, "00001": 20}


def test_population_based_training_continues_trials_from_better_ones_on_s3(
    ray_runtime, s3_endpoint
):
    """In-process trials on an s3:// root: at each perturbation PBT's worse trials load a
    better trial's checkpoint (read back from S3) and go on with its learning rate scaled
    by 0.8 or 1.2, which the trial then trains with. Synchronous, so that every
    perturbation compares all four trials even when they start far apart. Five epochs:
    a trial may finish more epochs before its pause takes effect (with three, a full
    suite once saw every continued trial already at its last epoch), so a clone's
    checkpoint at the first perturbation can be of a later epoch, and what is left is
    what the perturbed trial trains."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="pbt")
    raw = _raw(
        "s3://pbt/search",
        trial_mode="in_process",
        num_trials=4,
        max_concurrent_trials=4,
        search={"kind": "random", "seed": 3},
        space={"train.optimizer.lr": {"kind": "loguniform", "low": 1e-6, "high": 5e-2}},
        scheduler={
            "kind": "pbt",
            "perturbation_interval": 1,
            "quantile_fraction": 0.5,
            "resample_probability": 0,
            "synchronous": True,
        },
    )
    raw["storage"] = {"root": "s3://pbt/search", "endpoint_url": s3_endpoint}
    raw["train"]["max_epochs"] = 5
    # Four half-CPU trials at once leave Ray Data two of the runtime's four CPUs.
    raw["scaling"]["cpus_per_worker"] = 0.5
    cfg = config_from_dict(raw)

    outcome = run_tuning(cfg)

    store = Storage(cfg.storage)
    experiment = store.path("tune", outcome.experiment)
    assert store.exists(f"{experiment}/{RESULTS_FILE}")
    assert store.exists(f"{experiment}/{BEST_CONFIG_FILE}")
    assert outcome.version.uri.startswith("s3://pbt/search/models/tiny-wafer/")
    assert set(outcome.trials["state"]) <= {"completed", "early_stopped"}
    # One line per exploit: [target, clone, target iteration, clone iteration, clone's
    # values, target's new values].
    exploits = [
        json.loads(line) for line in store.read_text(f"{experiment}/pbt_global.txt").splitlines()
    ]
    assert exploits, "PBT never continued a trial from another"
    paths = {row.trial_id.split("_")[1]: row.path for row in outcome.trials.itertuples()}
    continued = []
    for target, _, _, _, clone_values, new_values in exploits:
        new_lr = new_values["train.optimizer.lr"]
        assert new_lr / clone_values["train.optimizer.lr"] == pytest.approx(0.8) or (
            new_lr / clone_values["train.optimizer.lr"] == pytest.approx(1.2)
        )
        reports = store.read_text(f"{paths[target.split('_')[0].zfill(5)]}/result.json")
        continued += [
            report
            for report in map(json.loads, reports.splitlines())
            if report["lr"] == pytest.approx(new_lr)
        ]
    # An exploit at the last epoch has nothing left to train; earlier ones go on.
    assert continued, f"no trial trained on with the values PBT gave it: {exploits}"
