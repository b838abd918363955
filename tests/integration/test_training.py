"""Training on the shared local Ray runtime: DDP, worker failure, resume, divergence."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from forgeml.cli import EXIT_BAD_INPUT, EXIT_DAMAGED, EXIT_DIVERGED, main
from forgeml.config import ExperimentConfig, StorageConfig, WaferSource, config_from_dict
from forgeml.data.builtin import write_wafer_dataset
from forgeml.data.wafer import CLASS_NAMES, generate, generate_map
from forgeml.model_package import load_model
from forgeml.serve.deploy import AppArgs, plan
from forgeml.storage import ModelRegistry, PackageIntegrityError, Storage
from forgeml.train.trainer import TrainingOutcome, run_training
from mlflow import MlflowClient
from PIL import Image
from ray.util.state import list_actors

from tests.conftest import PACKAGE_FILES, REPO, tiny_config, tiny_raw_config, write_config
from tests.integration.tracked import mlflow_runs, tensorboard_scalars
from tests.report_check import check_report


def _checkpoints(store: Path) -> list[Path]:
    return sorted(p for p in store.glob("runs/*/checkpoint_*") if p.is_dir())


def _last_registered_epoch(store: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (0 if none yet).

    A checkpoint folder appears while it is still being uploaded; only the controller's
    snapshot says that a checkpoint is complete and will be restored from.
    """
    for snapshot in store.glob("runs/*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):
            continue
        if latest:
            return latest["metrics"]["epoch"]
    return 0


def _train_worker_pids(runtime) -> list[int]:
    """The processes of ``runtime`` (the shared runtime's context) that run Ray Train
    workers, from its own actor table: nothing another Ray on the machine started."""
    actors = list_actors(
        address=f"http://{runtime.dashboard_url}",
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [actor.pid for actor in actors]


@dataclass(frozen=True)
class DdpRun:
    """What the module's one two-worker DDP run left: its store, config, outcome and the
    package it registered."""

    store: Path
    cfg: ExperimentConfig
    outcome: TrainingOutcome
    package: Path

    @property
    def metrics(self) -> dict:
        return json.loads((self.package / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(ray_runtime, tmp_path_factory) -> DdpRun:
    """Two workers fit the tiny CNN for 3 epochs on wafer maps exported as parquet files,
    with newly labelled maps appended, augmentation and MLflow tracking: trained once,
    for every test below that checks a part of what such a run leaves."""
    folder = tmp_path_factory.mktemp("ddp")
    store = folder / "store"
    store.mkdir()
    exported = folder / "wm811k-export"
    write_wafer_dataset(
        Storage(StorageConfig(root=str(folder))),
        str(exported),
        WaferSource(samples_per_class=30, image_size=16, shards=3),
        seed=1,
    )
    source = {
        "kind": "parquet",
        "path": str(exported),
        "image_size": 16,
        "class_names": list(CLASS_NAMES),
    }
    # newly labelled maps appended to the source, as a retraining adds them
    appended = folder / "appended"
    appended.mkdir()
    new_rows = generate(samples_per_class=5, size=16, seed=2, first_id=100_000)
    table = pa.table(
        {
            "sample_id": new_rows["sample_id"],
            "image": pa.array([image.tobytes() for image in new_rows["image"]], pa.binary()),
            "label": new_rows["label"],
        }
    )
    pq.write_table(table, appended / "new.parquet")
    cfg = tiny_config(
        store,
        data={
            "source": source,
            "append": [str(appended)],
            "augment": {"rotate90": True, "flip": True},
        },
        scaling={"num_workers": 2},
        train={"max_epochs": 3, "checkpoint": {"keep_top_k": 1}},
        tracking={"mlflow": {}},
    )
    outcome = run_training(cfg)
    return DdpRun(store, cfg, outcome, store / "models" / "tiny-wafer" / "v1")


def test_two_worker_ddp_fit_on_parquet_files_registers_a_complete_package(ddp_run):
    outcome, store = ddp_run.outcome, ddp_run.store

    assert outcome.metrics["run"]["workers"] == 2
    assert [h["epoch"] for h in outcome.metrics["history"]] == [1, 2, 3]
    assert outcome.version.ref == "tiny-wafer:v1"
    assert {p.name for p in ddp_run.package.iterdir()} >= PACKAGE_FILES
    loaded = load_model(ModelRegistry(Storage(ddp_run.cfg.storage)), "tiny-wafer")
    assert loaded.version.version == 1
    assert loaded.task.class_names == CLASS_NAMES
    assert loaded.preprocessor.image_size == 16
    # three reported; Ray Train keeps the best one and, for resuming, the latest
    assert 1 <= len(_checkpoints(store)) <= 2
    assert not (store / "datasets").exists()  # read in place, nothing generated


def test_the_split_holds_the_appended_rows_and_every_class_in_its_shares(ddp_run):
    data = ddp_run.metrics["data"]

    assert sum(data["rows"].values()) == 9 * 30 + 9 * 5
    assert data["split"] == "stratified by class, seed 7" and data["augmented"]
    for name in CLASS_NAMES:  # each class holds its shares to within one row
        total = sum(data["classes"][split][name] for split in ("train", "val", "test"))
        assert abs(data["classes"]["test"][name] - 0.15 * total) <= 1
        assert abs(data["classes"]["val"][name] - 0.15 * total) <= 1


def test_the_model_and_its_baseline_are_scored_on_the_same_test_rows(ddp_run):
    metrics = ddp_run.metrics
    data, test = metrics["data"], metrics["test"]

    assert 0.0 <= test["accuracy"] <= 1.0
    assert len(test["confusion_matrix"]["matrix"]) == 9
    assert sum(map(sum, test["confusion_matrix"]["matrix"])) == data["rows"]["test"]
    baseline = metrics["baseline"]  # fitted on the same split's pixels, scored on its test rows
    assert baseline["model"] == "logistic regression on the pixels"
    assert baseline["train_rows"] == data["rows"]["train"]
    assert [row["metric"] for row in baseline["compared"]] == ["accuracy", "auroc_ovr"]
    assert sum(map(sum, baseline["test"]["confusion_matrix"]["matrix"])) == data["rows"]["test"]


def test_runs_on_an_embedded_runtime_start_no_preemption_watcher(ray_runtime, ddp_run):
    """The shared runtime starts as forgeml's embedded runtime does; its one node is the
    driver's own, which no autoscaler drains, so Ray Train's per-run preemption watcher
    (a process of its own) is off. The actor table keeps ended actors too."""
    classes = {
        actor.class_name
        for actor in list_actors(address=f"http://{ray_runtime.dashboard_url}", limit=10_000)
    }

    assert {"TrainController", "RayTrainWorker"} <= classes
    assert "PreemptionWatcher" not in classes


def test_the_first_epochs_of_a_tiny_cnn_lower_its_training_loss(ddp_run):
    history = ddp_run.metrics["history"]

    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_rank_0_alone_logs_every_epoch_to_tensorboard(ddp_run):
    metrics = ddp_run.metrics
    run_dir = ddp_run.store / "runs" / ddp_run.outcome.run_name

    scalars = tensorboard_scalars(run_dir / "tensorboard")

    assert [step for step, _ in scalars["val_loss"]] == [1, 2, 3]
    assert [value for _, value in scalars["train_loss"]] == pytest.approx(
        [h["train_loss"] for h in metrics["history"]]
    )
    assert {"lr", "samples_per_s", "val_accuracy", "val_macro_f1"} <= set(scalars)
    assert scalars["test/accuracy"][0][1] == pytest.approx(metrics["test"]["accuracy"])


def test_rank_0_alone_logs_every_epoch_and_the_package_to_one_mlflow_run(ddp_run):
    store, test = ddp_run.store, ddp_run.metrics["test"]

    (run,) = mlflow_runs(store, "tiny-wafer")

    assert run.info.status == "FINISHED" and run.info.run_name == ddp_run.outcome.run_name
    assert run.data.params["model.kind"] == "cnn" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["forgeml.model_version"] == "tiny-wafer:v1"
    assert run.data.metrics["test/accuracy"] == pytest.approx(test["accuracy"])
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    history_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert history_steps == [1, 2, 3]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "model_package")}
    assert {f"model_package/{name}" for name in PACKAGE_FILES} <= logged


def test_the_run_report_renders_in_a_browser(ddp_run, tmp_path):
    """Curves, confusion matrix, ROC/PR and Grad-CAM, every image drawn."""
    report = ddp_run.package / "report.html"

    headings = check_report(report, tmp_path, min_images=4)

    assert headings[:5] == [
        "Test metrics",
        "Baseline",
        "Learning curves",
        "Confusion matrix",
        "ROC and precision-recall",
    ]
    assert "Sample predictions and explanations" in headings
    assert "Grad-CAM" in report.read_text()


def test_forgeml_report_writes_the_run_report_again_from_the_package_alone(ddp_run, tmp_path):
    again = tmp_path / "again.html"
    root = ["--storage-root", str(ddp_run.store)]

    assert main(["report", "--model", "tiny-wafer:v1", *root, "--output", str(again)]) == 0

    headings = re.findall(r"<h2>(.*?)</h2>", (ddp_run.package / "report.html").read_text())
    assert re.findall(r"<h2>(.*?)</h2>", again.read_text()) == headings
    assert main(["models", "verify", "tiny-wafer:v1", *root]) == 0  # the manifest follows


def _explain_args(ddp_run, tmp_path: Path) -> list[str]:
    """`forgeml explain` arguments for the run's model and a request file of two maps, a
    center and an edge-ring one."""
    request = tmp_path / "request.json"
    maps = [generate_map(label, 16, np.random.default_rng(label)) for label in (1, 4)]
    request.write_text(json.dumps({"instances": [{"image": m.tolist()} for m in maps]}))
    root = ["--storage-root", str(ddp_run.store)]
    return ["explain", "--model", "tiny-wafer", "--input", str(request), *root]


def test_forgeml_explain_answers_a_grad_cam_heatmap_of_each_predicted_class(
    ddp_run, tmp_path, capsys
):
    args = _explain_args(ddp_run, tmp_path)
    capsys.readouterr()

    assert main(args) == 0

    explained = json.loads(capsys.readouterr().out)["explanations"]
    assert [row["explained"] for row in explained] == [
        row["prediction"]["label"] for row in explained
    ]
    for row in explained:
        heatmap = np.array(row["heatmap"])
        assert heatmap.shape == (16, 16) and heatmap.sum() == pytest.approx(1, abs=1e-3)


def test_a_damaged_package_is_refused_by_name_wherever_it_is_loaded(ddp_run, tmp_path, capsys):
    """A copy of the run's registry with model.pt cut short: explaining and serving it
    are refused with the file named, and models verify reports it."""
    damaged = tmp_path / "store"
    shutil.copytree(ddp_run.store / "models", damaged / "models")
    model_file = damaged / "models" / "tiny-wafer" / "v1" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    args = _explain_args(ddp_run, tmp_path)
    args[args.index("--storage-root") + 1] = str(damaged)
    capsys.readouterr()

    assert main(args) == EXIT_BAD_INPUT

    assert f"{model_file} has" in capsys.readouterr().err
    with pytest.raises(PackageIntegrityError, match="tiny-wafer:v1 is damaged: .*model.pt has"):
        plan(AppArgs(models=["tiny-wafer"], storage=StorageConfig(root=str(damaged))))
    assert main(["models", "verify", "--storage-root", str(damaged)]) == EXIT_DAMAGED
    assert "tiny-wafer:v1  DAMAGED" in capsys.readouterr().out


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_package_whose_model_file_would_run_code_is_refused(ddp_run, tmp_path, capsys):
    """The run's package registered again with a model.pt that runs code when unpickled
    (its manifest intact): loading it refuses the file and runs nothing."""
    source = ModelRegistry(Storage(ddp_run.cfg.storage))
    version = source.resolve("tiny-wafer:v1")
    files = source.read_package(version)
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"format": 2, "state_dict": _RunsCodeWhenUnpickled(marker)}, buffer)
    files["model.pt"] = buffer.getvalue()
    ModelRegistry(Storage(StorageConfig(root=str(tmp_path / "store")))).register(
        "tiny-wafer", files
    )
    args = _explain_args(ddp_run, tmp_path)
    args[args.index("--storage-root") + 1] = str(tmp_path / "store")
    capsys.readouterr()

    assert main(args) == EXIT_BAD_INPUT

    assert "tiny-wafer:v1: model.pt holds more than weights" in capsys.readouterr().err
    assert not marker.exists()


def test_forgeml_explain_draws_the_heatmaps_of_a_chosen_class(ddp_run, tmp_path, capsys):
    heatmaps = tmp_path / "heatmaps.png"
    args = _explain_args(ddp_run, tmp_path)
    capsys.readouterr()

    assert main([*args, "--output", str(heatmaps), "--target", "edge-ring"]) == 0

    assert {row["explained"] for row in json.loads(capsys.readouterr().out)["explanations"]} == {
        "edge-ring"
    }
    assert Image.open(heatmaps).size[0] > 200


def test_forgeml_explain_refuses_a_class_the_model_does_not_have(ddp_run, tmp_path, capsys):
    args = _explain_args(ddp_run, tmp_path)
    capsys.readouterr()

    assert main([*args, "--target", "no-such-class"]) == 2

    assert "not a class of tiny-wafer" in capsys.readouterr().err


def test_a_run_starts_from_the_registered_model_with_its_first_block_frozen_for_an_epoch(
    ddp_run, tmp_path
):
    """model.init_from the module's package: every tensor loads (same shapes), the first
    conv block stays as loaded through epoch 1 and trains in epoch 2, the run starts
    where the package ended (its first epoch's validation loss is below the package's
    own first epoch's), and the run record lists what was loaded."""
    raw = ddp_run.cfg.model_dump(mode="json")
    raw["name"] = "tiny-wafer-tuned"
    raw["data"].pop("append")
    raw["model"]["init_from"] = "tiny-wafer:v1"
    raw["train"] |= {
        "max_epochs": 2,
        "freeze": {"params": ["features.0.*"], "epochs": 1},
        "optimizer": raw["train"]["optimizer"] | {"pretrained_lr_scale": 0.5},
        "checkpoint": {"keep_top_k": 2},
    }
    raw["scaling"]["num_workers"] = 1
    raw["tracking"] = {}
    cfg = config_from_dict(raw)

    outcome = run_training(cfg)

    start = load_model(ModelRegistry(Storage(cfg.storage)), "tiny-wafer:v1").model.state_dict()
    record = outcome.metrics["run"]["init_from"]
    assert record["source"] == "tiny-wafer:v1" and record["loaded"] == sorted(start)
    assert record["skipped"] == {} and record["missing"] == [] == record["unused"]
    states = {}
    for state_file in (ddp_run.store / "runs" / outcome.run_name).glob("checkpoint_*/state.pt"):
        state = torch.load(state_file, map_location="cpu")
        states[state["epoch"]] = state["model"]
    first_block = [
        name for name in start if name.startswith("features.0.") and "running" not in name
    ]
    assert first_block and sorted(states) == [1, 2]
    for name in first_block:
        if name.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(states[1][name], start[name], rtol=0, atol=0)
    assert any(not torch.equal(states[2][n], start[n]) for n in first_block if "weight" in n)
    assert not torch.equal(states[1]["features.1.0.weight"], start["features.1.0.weight"])
    tuned, first = outcome.metrics["history"][0], ddp_run.metrics["history"][0]
    assert tuned["val_loss"] < first["val_loss"], (tuned["val_loss"], first["val_loss"])


def test_killed_worker_resumes_from_its_last_checkpoint(ray_runtime, store):
    cfg = tiny_config(store, train={"max_epochs": 8, "max_failures": 2}, tracking={"mlflow": {}})
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if _last_registered_epoch(store) >= 1:
                for pid in _train_worker_pids(ray_runtime):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    outcome = run_training(cfg)
    killer.join(timeout=5)

    assert killed, "no training worker was found to kill"
    (restart,) = outcome.metrics["run"]["restarts"]
    assert 1 <= restart["epoch"] < 8 and restart["step"] == 0 and restart["checkpoint"] == "epoch"
    assert 0 < restart["resumed_at"] - restart["saved_at"] < 120
    assert [h["epoch"] for h in outcome.metrics["history"]] == list(range(1, 9))
    assert outcome.status == "completed"
    # the restarted workers logged on into the run they began, and TensorBoard dropped
    # what the killed attempt logged after its checkpoint
    (run,) = mlflow_runs(store, "tiny-wafer")
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert steps == set(range(1, 9))
    scalars = tensorboard_scalars(store / "runs" / outcome.run_name / "tensorboard")
    assert [step for step, _ in scalars["val_loss"]] == list(range(1, 9))


def test_an_elastic_run_with_fewer_workers_learns_what_the_full_size_learns(ray_runtime, tmp_path):
    """scaling.num_workers [1, 2] with batches of 16 on a runtime that holds one such
    worker: it accumulates two micro-batches per step, so every step sees the global batch
    of 32 that a fixed run of batch 32 sees, in the same order, and the two learn the
    same (a model without batch statistics, whose loss is a mean over rows)."""

    def trained(folder: str, batch_size: int, **scaling) -> dict:
        raw = tiny_raw_config(tmp_path / folder, train={"max_epochs": 3, "batch_size": batch_size})
        raw["model"] = {"kind": "mlp", "hidden": [32], "batch_norm": False, "dropout": 0.0}
        raw["scaling"] |= scaling
        return run_training(config_from_dict(raw)).metrics

    fixed = trained("fixed", 32)
    elastic = trained("elastic", 16, num_workers=[1, 2], cpus_per_worker=3)

    assert elastic["run"]["workers"] == 1
    assert [(h["workers"], h["global_batch"]) for h in elastic["history"]] == [(1, 32)] * 3
    assert [h["global_batch"] for h in fixed["history"]] == [32] * 3
    for grown, whole in zip(elastic["history"], fixed["history"], strict=True):
        assert grown["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
        assert grown["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-4)


def test_resume_continues_a_stopped_run(ray_runtime, store, tmp_path):
    raw = tiny_raw_config(store, train={"max_epochs": 6})
    config = write_config(tmp_path / "tiny.yaml", raw)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while (
        _last_registered_epoch(store) < 2 and driver.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    assert driver.returncode == -signal.SIGKILL, "the run finished before it could be stopped"
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    assert registry.versions("tiny-wafer") == []

    code = main(["train", "--config", str(config), "--resume"])

    assert code == 0
    version = registry.resolve("tiny-wafer")
    metrics = json.loads(registry.read(version, "metrics.json"))
    (restart,) = metrics["run"]["restarts"]
    assert restart["epoch"] >= 2 and restart["step"] == 0
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 7))
    assert len(list((store / "runs").iterdir())) == 1


def test_nan_loss_is_a_clear_error_and_registers_nothing(ray_runtime, store, tmp_path, capsys):
    raw = tiny_raw_config(
        store,
        train={
            "max_epochs": 3,
            "grad_clip_norm": None,
            "max_failures": 0,
            "optimizer": {"name": "sgd", "lr": 1e30},
        },
    )
    code = main(["train", "--config", str(write_config(tmp_path / "nan.yaml", raw))])
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED
    assert "training diverged at epoch 1" in err
    assert "lower train.optimizer.lr (was 1e+30)" in err
    assert ModelRegistry(Storage(StorageConfig(root=str(store)))).versions("tiny-wafer") == []
