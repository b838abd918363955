"""From a config to a registered model: prepare data, fit a TorchTrainer, evaluate, register.

The driver side of training. Runs on the embedded runtime, a ``ray start`` cluster or
a KubeRay cluster alike; ``runtime.connect()`` decides which.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train.torch import TorchTrainer

from forgeml import console
from forgeml.config import ExperimentConfig
from forgeml.data.pipeline import PreparedData
from forgeml.launch import prepare_launch
from forgeml.registration import register_checkpoint
from forgeml.storage import ModelVersion, Storage
from forgeml.tracking import run_tracking
from forgeml.train.loop import CHECKPOINT_FILE, train_loop_per_worker
from forgeml.train.pretrained import Pretrained, load_pretrained
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


def loop_config(
    cfg: ExperimentConfig, data: PreparedData, tracking: dict, pretrained: Pretrained | None
) -> dict:
    """What every rank's training loop is given besides its datasets; ``tracking`` is
    where rank 0 logs the run (``tracking.run_tracking``), ``pretrained`` what
    ``model.init_from`` gives the model."""
    weights = initial_weights(cfg, data)
    if pretrained is not None:
        weights |= {name: value.tolist() for name, value in pretrained.weights.items()}
    return {
        "experiment": cfg.model_dump(mode="json"),
        "target": data.training_target(cfg.task).to_dict(),
        "inputs": data.preprocessor.model_inputs.to_dict(),
        "train_rows": data.sizes["train"],
        "tracking": tracking,
        "initial_weights": weights,
        "pretrained": sorted(pretrained.weights) if pretrained else [],
        "augment": data.augment_settings(),
    }


def build_trainer(
    cfg: ExperimentConfig,
    storage: Storage,
    data: PreparedData,
    run_name: str,
    tracking: dict,
    runs_path: str | None = None,
    callbacks: list | None = None,
    pretrained: Pretrained | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one run, checkpointing to ``runs_path/run_name`` (default
    ``<storage>/runs``) and logging as ``tracking`` says, its model starting from
    ``pretrained``; ``callbacks`` are Ray Train callbacks (Tune's report callback)."""
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
        train_loop_config=loop_config(cfg, data, tracking, pretrained),
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


def startup_seconds(
    started: float, prepared: float, launched: float, first_step_at: float | None
) -> dict:
    """Where a run's time went before its first training step (wall-clock times): the
    data (read, split, preprocessing fitted) and the workers' start (Ray Train's
    controller and worker group, datasets dealt out, the model built), to the first step
    of the attempt that finished."""
    return {
        "data": round(prepared - started, 2),
        "workers": round(first_step_at - launched, 2) if first_step_at else None,
    }


def run_training(cfg: ExperimentConfig, resume: bool | str = False) -> TrainingOutcome:
    """Train, evaluate on the test split and register a model package.

    Raises TrainingDiverged when the loss is not finite (nothing registered),
    StorageFailure when the storage root fails (full, or unreachable past its retries),
    and lets Ray Train's TrainingFailedError through when workers fail beyond
    ``max_failures``.
    """
    started = time.time()
    launch = prepare_launch(cfg, "runs", cfg.name, resume)
    prepared = time.time()
    storage, run_name, data = launch.storage, launch.name, launch.data
    tracking = run_tracking(launch.tracking, cfg, storage, launch.path, run_name)
    pretrained = load_pretrained(cfg, storage, data)
    trainer = build_trainer(cfg, storage, data, run_name, tracking, pretrained=pretrained)
    logger.info("training %s as run %s (%s)", cfg.name, run_name, storage.uri("runs", run_name))
    launched = time.time()
    with storage.failures_named(run_name):
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
        "wall_s": round(time.time() - started, 1),
        "startup_s": startup_seconds(started, prepared, launched, outcome["first_step_at"]),
        **({"init_from": pretrained.record()} if pretrained else {}),
    }
    with storage.failures_named(run_name):
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
