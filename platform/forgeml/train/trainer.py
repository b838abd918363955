"""From a config to a registered model: prepare data, fit a TorchTrainer, evaluate, register.

The driver side of training. Runs on the embedded runtime, a ``ray start`` cluster or
a KubeRay cluster alike; ``runtime.connect()`` decides which.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import ray.train
import torch
from ray.train.torch import TorchTrainer

from forgeml import console, runtime
from forgeml.baselines import fit_baseline
from forgeml.config import ExperimentConfig
from forgeml.data.pipeline import PreparedData, prepare_data
from forgeml.data.sources import open_source
from forgeml.evaluate import evaluate
from forgeml.model_package import LoadedModel, PackageContents, load_model, package_files
from forgeml.models import build_model
from forgeml.monitor.drift import reference_statistics
from forgeml.report import (
    EVALUATION_FILE,
    EXAMPLES,
    REPORT_FILE,
    evaluation_arrays,
    read_arrays,
    run_report,
)
from forgeml.storage import ModelRegistry, ModelVersion, Storage
from forgeml.tasks import build_task
from forgeml.tasks.generative import Judge, code_maps
from forgeml.tracking import log_registration, open_tracking, run_tracking
from forgeml.train.loop import CHECKPOINT_FILE, train_loop_per_worker
from forgeml.train.placement import plan_placement
from forgeml.train.warm_start import initial_weights

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; nothing was registered."""


@dataclass
class TrainingOutcome:
    run_name: str
    status: str
    epochs: int
    version: ModelVersion
    metrics: dict


def resolve_run_name(storage: Storage, folder: str, prefix: str, resume: bool | str) -> str:
    """A fresh ``<prefix>-<UTC time>`` name under ``<storage>/<folder>``, or the one to
    continue for ``--resume [NAME]``: the latest, or NAME if it exists there."""
    if resume is False:
        return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{8}}-\d{{6}}$")
    names = sorted(n for n in storage.list_dirs(storage.path(folder)) if pattern.match(n))
    if resume is True:
        if not names:
            raise FileNotFoundError(
                f"--resume: no earlier run of {prefix!r} under {storage.uri(folder)}"
            )
        return names[-1]
    if resume not in names:
        raise FileNotFoundError(f"--resume: no {resume!r} under {storage.uri(folder)}")
    return resume


def loop_config(cfg: ExperimentConfig, data: PreparedData, tracking: dict) -> dict:
    """What every rank's training loop is given besides its datasets; ``tracking`` is
    where rank 0 logs the run (``tracking.run_tracking``)."""
    return {
        "experiment": cfg.model_dump(mode="json"),
        "target": data.training_target(cfg.task).to_dict(),
        "inputs": data.preprocessor.model_inputs.to_dict(),
        "train_rows": data.sizes["train"],
        "tracking": tracking,
        "initial_weights": initial_weights(cfg, data),
        "augment": data.augment.model_dump() if data.augmenting else None,
    }


def build_trainer(
    cfg: ExperimentConfig,
    storage: Storage,
    data: PreparedData,
    run_name: str,
    tracking: dict,
    runs_path: str | None = None,
    callbacks: list | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one run, checkpointing to ``runs_path/run_name`` (default
    ``<storage>/runs``) and logging as ``tracking`` says; ``callbacks`` are Ray Train
    callbacks (Tune's report callback)."""
    early = cfg.train.early_stopping
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=runs_path or storage.path("runs"),
        callbacks=callbacks,
        storage_filesystem=None if storage.is_local else storage.fs,
        logging_config=console.ray_train_logging_config(),
        failure_config=ray.train.FailureConfig(
            max_failures=cfg.train.max_failures,
            max_preemption_failures=cfg.train.preemption.max_restarts,
        ),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.train.checkpoint.keep_top_k,
            checkpoint_score_attribute=early.metric,
            checkpoint_score_order=early.mode,
        ),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, data, tracking),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
            label_selector=cfg.scaling.label_selector,
        ),
        run_config=run_config,
        datasets=data.trainer_datasets(),
        dataset_config=data.data_config(),
    )


def best_checkpoint(result: ray.train.Result, metric: str, mode: str) -> ray.train.Checkpoint:
    """The kept checkpoint with the best ``metric``; a preemption checkpoint, written
    inside an epoch, has no validation score (NaN) and is never the one registered."""
    scored = [
        (checkpoint, metrics[metric])
        for checkpoint, metrics in result.best_checkpoints
        if math.isfinite(metrics.get(metric, math.nan))
    ]
    pick = max if mode == "max" else min
    return pick(scored, key=lambda pair: pair[1])[0]


def load_judge(cfg: ExperimentConfig, storage: Storage, images) -> Judge | None:
    """The registered classifier that ``task.judge`` names, if any, checked to rate the
    ``images`` this experiment draws (their ``ImageFeatures``, or the fitted
    preprocessor): the same size and values. Called before training too, so a wrong
    judge fails the job early."""
    judge_cfg = getattr(cfg.task, "judge", None)
    if judge_cfg is None:
        return None
    try:
        loaded = load_model(ModelRegistry(storage), judge_cfg.model)
    except KeyError as exc:
        raise ValueError(f"task.judge.model: {exc.args[0]}; train the classifier first") from None
    reads = loaded.preprocessor
    if loaded.config.task.kind != "classification" or reads.describe()["kind"] != "image":
        raise ValueError(
            f"task.judge.model: {loaded.version.ref} is a {loaded.config.task.kind} model of "
            f"{reads.describe()['kind']} data; a judge classifies images"
        )
    if judge_cfg.no_defect_class not in loaded.task.class_names:
        raise ValueError(
            f"task.judge.no_defect_class: {judge_cfg.no_defect_class!r} is not a class of "
            f"{loaded.version.ref} ({', '.join(loaded.task.class_names)})"
        )
    if (reads.image_size, reads.max_value) != (images.image_size, images.max_value):
        raise ValueError(
            f"task.judge.model: {loaded.version.ref} reads {reads.image_size}x"
            f"{reads.image_size} images of values 0-{reads.max_value}; this experiment "
            f"draws {images.image_size}x{images.image_size} images of values "
            f"0-{images.max_value}"
        )
    return Judge(loaded.version.ref, judge_cfg, loaded.model, loaded.preprocessor, loaded.task)


def run_training(cfg: ExperimentConfig, resume: bool | str = False) -> TrainingOutcome:
    """Train, evaluate on the test split and register a model package.

    Raises TrainingDiverged when the loss is not finite (nothing registered) and lets
    Ray Train's TrainingFailedError through when workers fail beyond ``max_failures``.
    """
    started = time.monotonic()
    storage = Storage(cfg.storage)
    run_name = resolve_run_name(storage, "runs", cfg.name, resume)
    console.keep_run_log(storage, storage.path("runs", run_name))
    source = open_source(cfg, storage)
    load_judge(cfg, storage, source.features)
    runtime.connect()
    runtime.require_shared_storage(cfg.storage)
    plan_placement(cfg.scaling, streams_data=not cfg.data.cache)
    tracking = run_tracking(
        open_tracking(cfg, storage), cfg, storage, storage.path("runs", run_name), run_name
    )
    data = prepare_data(cfg, source, storage.path("runs", run_name, "rejected"), storage.fs)
    trainer = build_trainer(cfg, storage, data, run_name, tracking)
    logger.info("training %s as run %s (%s)", cfg.name, run_name, storage.uri("runs", run_name))
    result = trainer.fit()
    outcome = result.return_value
    history = outcome["history"]
    if outcome["status"] == "diverged":
        last = history[-1]
        raise TrainingDiverged(
            f"training diverged at epoch {last['epoch']}: train_loss={last['train_loss']}, "
            f"val_loss={last['val_loss']}; lower train.optimizer.lr "
            f"(was {cfg.train.optimizer.lr:g}) or set train.grad_clip_norm. "
            "No model version was registered."
        )

    early = cfg.train.early_stopping
    best = best_checkpoint(result, early.metric, early.mode)
    with best.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu")
    run = {
        "name": run_name,
        "uri": storage.uri("runs", run_name),
        "workers": outcome["world_size"],
        "ranks": outcome["ranks"],
        "restarts": outcome["restarts"],
        "use_gpu": cfg.scaling.use_gpu,
        "wall_s": round(time.monotonic() - started, 1),
    }
    version, metrics = register_checkpoint(
        cfg, storage, data, state, outcome["status"], history, run
    )
    return TrainingOutcome(
        run_name=run_name,
        status=outcome["status"],
        epochs=len(history),
        version=version,
        metrics=metrics,
    )


def register_checkpoint(
    cfg: ExperimentConfig,
    storage: Storage,
    data: PreparedData,
    state: dict,
    status: str,
    history: list[dict],
    run: dict,
) -> tuple[ModelVersion, dict]:
    """Evaluate a checkpoint's model on the test split and register it as a package."""
    early = cfg.train.early_stopping
    task = build_task(cfg.task, data.target)
    model = build_model(cfg.model, data.preprocessor.model_inputs, task.num_outputs)
    model.load_state_dict(state["model"])
    evaluation = evaluate(model, task, data.test, data.preprocessor)
    baseline = fit_baseline(
        data.preprocessor,
        task,
        data.train,
        data.test,
        data.sizes["train"],
        evaluation.metrics,
        cfg.seed,
    )
    files = {}
    if hasattr(task, "sample_report"):  # generative: draw, show and rate new images
        judge = load_judge(cfg, storage, data.preprocessor)
        test_maps = code_maps(data.test.iter_batches(batch_size=1024, batch_format="numpy"))
        sampled, files = task.sample_report(model, test_maps, judge)
        evaluation.metrics |= sampled

    metrics = {
        "test": evaluation.metrics,
        **({"baseline": baseline} if baseline else {}),
        "best_epoch": state["epoch"],
        "selected_by": {"metric": early.metric, "mode": early.mode},
        "status": status,
        "history": history,
        "data": data.summary(cfg.task),
        "run": run,
        "registered_at": f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
    }
    examples = data.test.take_batch(EXAMPLES, batch_format="numpy")
    files[EVALUATION_FILE] = evaluation_arrays(evaluation.predictions, evaluation.targets, examples)
    package = package_files(
        PackageContents(
            config=cfg,
            preprocessor=data.preprocessor,
            state_dict=state["model"],
            metrics=metrics,
            reference=reference_statistics(
                evaluation.inputs, task.drift_values(evaluation.predictions), cfg.seed
            ),
            files=files,
        )
    )
    model.eval()
    loaded = LoadedModel(None, cfg, data.preprocessor, model, task, metrics)
    package[REPORT_FILE] = run_report(
        f"{cfg.name} ({run['name']})", loaded, metrics, read_arrays(files[EVALUATION_FILE]), package
    ).encode()
    version = ModelRegistry(storage).register(cfg.name, package)
    log_registration(cfg, state.get("tracking"), version.ref, metrics, package)
    return version, metrics
