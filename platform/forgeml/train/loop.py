"""The per-worker training loop run by Ray Train on every DDP rank.

``train_worker`` reads top to bottom, one ``WorkerRecipe`` method per step: build the
model, optimizer and schedule from the config; ``restore`` the latest checkpoint if one
is handed over (a restarted worker group, ``--resume``, or a Population Based Training
trial continuing from another's); then ``train``: per epoch train on this rank's shard
(checkpointing inside it on a preemption notice), validate, decide on early stopping,
and report metrics with a checkpoint. All ranks take the same decisions because every
number they decide on is all-reduced first.

The loop reaches Ray only through a ``WorkerSession``: ``RayTrainSession`` on a Ray
Train worker, or a Tune trial's own session when a search trains in-process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import ray.data
import ray.train
import ray.train.collective
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from forgeml.config import ExperimentConfig
from forgeml.console import configure_worker_logging, format_seconds
from forgeml.data.base import ModelInputs, TargetSpec
from forgeml.models import build_model
from forgeml.storage import FULL_DEVICE, StorageFailure, no_room
from forgeml.tasks import batch_dtypes, build_task
from forgeml.tracking import EpochLogger
from forgeml.train.augment import augment_batch
from forgeml.train.early_stopping import EarlyStopping
from forgeml.train.optim import BatchPlan, LRSchedule, apply_hyperparameters, build_optimizer
from forgeml.train.preemption import PreemptionWatch
from forgeml.train.pretrained import frozen_names

logger = logging.getLogger("forgeml.train")

CHECKPOINT_FILE = "state.pt"


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _autocast(cfg: ExperimentConfig, device: torch.device):
    use_bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and device.type == "cuda"
    )
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _ranks(rank: int, world_size: int) -> list[dict]:
    """Where every rank runs (its Ray node and that node's address), in rank order."""
    context = ray.get_runtime_context()
    mine = {
        "rank": rank,
        "node_id": context.get_node_id(),
        "address": ray.util.get_node_ip_address(),
    }
    if world_size == 1 or not dist.is_initialized():
        return [mine]
    gathered: list[dict | None] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _gradient_sync(model: torch.nn.Module, sync: bool):
    """DDP all-reduces gradients in every backward pass; of an accumulation only the
    last micro-batch's pass needs to."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


class WorkerSession(Protocol):
    """What the loop needs from whatever runs it."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def checkpoint(self) -> ray.train.Checkpoint | None: ...

    def dataset(self, name: str) -> ray.data.DataIterator: ...

    def report(self, metrics: dict, checkpoint: ray.train.Checkpoint | None = None) -> None: ...

    def preemption_info(self) -> ray.train.PreemptionInfo | None: ...

    def broadcast_from_rank_zero(self, value): ...


class RayTrainSession:
    """A Ray Train worker: DDP rank, dataset shard, reports to the Train controller."""

    def __init__(self):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        return ray.train.torch.prepare_model(model)

    def checkpoint(self):
        return ray.train.get_checkpoint()

    def dataset(self, name):
        return ray.train.get_dataset_shard(name)

    def report(self, metrics, checkpoint=None):
        try:
            ray.train.report(metrics, checkpoint=checkpoint)
        except OSError as exc:
            if checkpoint is None or exc.errno not in FULL_DEVICE:
                raise
            run = ray.train.get_context().get_storage().experiment_fs_path
            needed = sum(f.stat().st_size for f in Path(checkpoint.path).rglob("*") if f.is_file())
            raise StorageFailure(no_room(run, needed, "a checkpoint of ")) from exc

    def preemption_info(self):
        return ray.train.get_preemption_info()

    def broadcast_from_rank_zero(self, value):
        return ray.train.collective.broadcast_from_rank_zero(value)


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle's seed: a new row order for every epoch and rank, the same one
    for every run of a config."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def augmentation_generator(seed: int, epoch: int, rank: int, device: torch.device):
    """The generator of an epoch's random turns and flips on one rank."""
    generator = torch.Generator(device=device)
    # The second word of the shuffle's seed sequence: a stream of its own.
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2)[1]))
    return generator


def _model_with_initial_weights(
    cfg: ExperimentConfig, inputs: ModelInputs, task, initial_weights: dict
) -> torch.nn.Module:
    """The config's model, starting from the weights handed over (a warm start), if any."""
    model = build_model(cfg.model, inputs, task.num_outputs)
    start = {name: torch.tensor(value) for name, value in initial_weights.items()}
    unknown = model.load_state_dict(start, strict=False).unexpected_keys
    if unknown:
        raise ValueError(f"initial weights for parameters the model lacks: {unknown}")
    return model


def _lr_schedule(cfg: ExperimentConfig, optimizer, train_rows: int) -> LRSchedule:
    # The schedule counts steps at the largest size, the same at every size it restarts at.
    largest = BatchPlan.for_world(
        cfg.train.batch_size, cfg.scaling.max_workers, cfg.scaling.max_workers, train_rows
    )
    return LRSchedule(
        cfg.train.schedule,
        optimizer,
        steps_per_epoch=largest.steps_per_epoch,
        max_epochs=cfg.train.max_epochs,
        metric_mode=cfg.train.early_stopping.mode,
    )


def _diverged(record: dict) -> bool:
    """A non-finite training or validation loss: training cannot go on from here."""
    return not math.isfinite(record["train_loss"]) or not math.isfinite(record["val_loss"])


def train_loop_per_worker(config: dict) -> dict:
    """The TorchTrainer's entry point on every rank."""
    return train_worker(config, RayTrainSession())


def train_worker(config: dict, session: WorkerSession) -> dict:
    """Train one rank. Returns (on every rank) the run's status and per-epoch history."""
    configure_worker_logging()
    recipe = WorkerRecipe(config, session)
    recipe.restore(session.checkpoint())
    return recipe.train()


@dataclass
class EpochProgress:
    """How far this rank is through an epoch. A resumed epoch counts its steps from where
    the preemption checkpoint left off, and carries what those steps trained."""

    epoch: int
    first_step: int  # 0, or the steps a preemption checkpoint had taken of this epoch
    carried: list[float]  # loss sum, rows and seconds of those steps, all ranks together
    loss_sum: torch.Tensor  # of this rank's rows since (re)starting the epoch
    steps: int = 0
    rows: int = 0
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


@dataclass
class EpochTraining:
    """An epoch's training, over all ranks and including the steps before a restart."""

    loss: float  # mean per row
    rows: float
    seconds: float
    data_wait_s: float  # mean over the ranks
    started: float  # monotonic clock when the epoch began


class WorkerRecipe:
    """One rank's run: built from the config (``__init__``), ``restore`` from a
    checkpoint, then ``train``; every epoch trains, validates, checkpoints and reports."""

    def __init__(self, config: dict, session: WorkerSession):
        cfg = self.cfg = ExperimentConfig.model_validate(config["experiment"])
        self.session = session
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
        torch.set_num_threads(cfg.scaling.torch_threads or max(int(cfg.scaling.cpus_per_worker), 1))

        torch.manual_seed(cfg.seed)
        self.task = build_task(cfg.task, TargetSpec.from_dict(config["target"]))
        inputs = ModelInputs.from_dict(config["inputs"])
        self.dtypes = batch_dtypes(self.task, inputs)
        model = _model_with_initial_weights(cfg, inputs, self.task, config["initial_weights"])
        self.model = session.prepare_model(model)
        self.ranks = _ranks(self.rank, self.world_size)
        torch.manual_seed(cfg.seed * 1000 + self.rank)
        named = dict(_unwrap(self.model).named_parameters())
        loaded = set(config["pretrained"])
        pretrained = [p for name, p in named.items() if name in loaded]
        others = [p for name, p in named.items() if name not in loaded]
        groups = [{"params": others}]
        if pretrained and cfg.train.optimizer.pretrained_lr_scale < 1:
            lr = cfg.train.optimizer.lr * cfg.train.optimizer.pretrained_lr_scale
            groups.append({"params": pretrained, "lr": lr})
        else:
            groups[0]["params"] += pretrained
        self.optimizer = build_optimizer(cfg.train.optimizer, groups)
        self.frozen = [named[name] for name in frozen_names(cfg, named, loaded)]
        self.plan = BatchPlan.for_world(
            cfg.train.batch_size, cfg.scaling.max_workers, self.world_size, config["train_rows"]
        )
        self.schedule = _lr_schedule(cfg, self.optimizer, config["train_rows"])
        self.stopper = EarlyStopping(cfg.train.early_stopping)
        self.watched = cfg.train.early_stopping.metric
        self.watch = PreemptionWatch(session, cfg.train.preemption)
        self.augment = config["augment"]  # augment_batch's settings, or nothing
        self.tracking = config["tracking"]
        self.tracker: EpochLogger | None = None  # rank 0's, while training
        self.first_step_at: float | None = None  # wall clock of this attempt's first step

        # Where training starts, unless ``restore`` finds a checkpoint.
        self.history: list[dict] = []
        self.restarts: list[dict] = []  # every restart of this run from a checkpoint, in order
        self.start_epoch = 1
        self.done_steps = 0  # of start_epoch, by a preemption checkpoint
        self.carried = [0.0, 0.0, 0.0]  # loss sum, rows and seconds of those steps, all ranks
        self.resumed_tracking: dict | None = None  # the restored run's tracking state

    def restore(self, checkpoint: ray.train.Checkpoint | None) -> None:
        """Continue from ``checkpoint``, if one is handed over: at the epoch after it, or
        at the step of its epoch where a preemption checkpoint was written."""
        if not checkpoint:
            return
        cfg = self.cfg
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location=self.device)
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        # The checkpoint may come from a trial with other values (PBT): ours apply from here.
        # Checkpoints written before base_lr was recorded were saved at this run's lr.
        self.schedule.rescale(cfg.train.optimizer.lr / state.get("base_lr", cfg.train.optimizer.lr))
        apply_hyperparameters(self.optimizer, cfg.train.optimizer)
        self.stopper.load_state_dict(state["early_stopping"])
        self.history = state["history"]
        self.done_steps = state.get("step", 0)
        self.start_epoch = state["epoch"] + (0 if self.done_steps else 1)
        self.carried = state.get("carried", self.carried)
        self.restarts = [
            *state.get("restarts", []),
            {
                "epoch": state["epoch"],
                "step": self.done_steps,
                "checkpoint": state.get("kind", "epoch"),
                "saved_at": state.get("saved_at"),
                "deadline": state.get("deadline"),
                "write_s": state.get("write_s"),
                "resumed_at": round(time.time(), 3),
                "workers": self.world_size,
            },
        ]
        self.resumed_tracking = state.get("tracking")
        if self.rank == 0:
            where = f"step {self.done_steps} of epoch" if self.done_steps else "the end of epoch"
            logger.info(
                "resumed from the checkpoint at %s %d with %d worker(s)",
                where,
                state["epoch"],
                self.world_size,
            )

    def train(self) -> dict:
        """Train up to ``max_epochs``, or until early stopping or a non-finite loss.
        Returns the run's status, history, restarts, world size, where the ranks ran and
        when this attempt took its first step."""
        cfg = self.cfg
        if self.rank == 0:
            self.tracker = EpochLogger(self.tracking, cfg, self.resumed_tracking, self.start_epoch)
        train_shard, val_shard = self.session.dataset("train"), self.session.dataset("val")
        self.run_started = time.monotonic()
        status = "completed"
        try:
            for epoch in range(self.start_epoch, cfg.train.max_epochs + 1):
                training = self.train_epoch(epoch, train_shard)
                scores = self.validate(val_shard)
                record = self.epoch_record(epoch, training, scores)
                self.history.append(record)
                if _diverged(record):
                    status = "diverged"
                    self.session.report(record)
                    self.track(record)
                    break

                stop = self.stopper.update(record[self.watched], epoch)
                self.schedule.after_epoch(record[self.watched])
                record["best_epoch"] = self.stopper.best_epoch
                self.track(record)
                self.report_with_checkpoint(record, "epoch", epoch)
                if self.rank == 0:
                    self.log_epoch_line(record, scores)
                if stop:
                    status = "early_stopped"
                    if self.rank == 0:
                        self.log_early_stop()
                    break
        except BaseException:
            self.cleanup("failed")
            raise
        self.cleanup(status)
        return {
            "status": status,
            "history": self.history,
            "restarts": self.restarts,
            "world_size": self.world_size,
            "ranks": self.ranks,
            "first_step_at": self.first_step_at,
        }

    def train_epoch(self, epoch: int, shard: ray.data.DataIterator) -> EpochTraining:
        """One pass over this rank's shard; a resumed epoch trains the steps it had left,
        on a fresh pass. Checkpoints in between when a preemption notice asks for it."""
        first_step = self.done_steps if epoch == self.start_epoch else 0
        progress = EpochProgress(
            epoch=epoch,
            first_step=first_step,
            carried=self.carried if first_step else [0.0, 0.0, 0.0],
            loss_sum=torch.zeros((), dtype=torch.float64, device=self.device),
            steps=first_step,
        )
        self.model.train()
        generator = None
        if self.augment:
            generator = augmentation_generator(self.cfg.seed, epoch, self.rank, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        fetch_started = time.monotonic()
        for batch in shard.iter_torch_batches(
            batch_size=self.plan.step_rows,
            dtypes=self.dtypes,
            device=self.device,
            local_shuffle_buffer_size=4 * self.plan.step_rows,
            local_shuffle_seed=shuffle_seed(self.cfg.seed, epoch, self.rank),
        ):
            if first_step and progress.steps >= self.plan.steps_per_epoch:
                break
            step_started = time.monotonic()
            progress.data_wait_s += step_started - fetch_started
            self.train_step(batch, generator, progress)
            reason = self.watch.ask(time.monotonic() - step_started)
            if reason:
                self.checkpoint_for_preemption(reason, progress)
            fetch_started = time.monotonic()
        return self._epoch_training(progress)

    def train_step(
        self, batch: dict, generator: torch.Generator | None, progress: EpochProgress
    ) -> None:
        """One optimizer step on a batch, accumulated over micro-batches that fit."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        inputs, targets = batch["inputs"], batch["target"]
        if self.augment:
            inputs, targets = augment_batch(inputs, targets, **self.augment, generator=generator)
        micro = self.plan.micro_batch
        parts = list(zip(inputs.split(micro), targets.split(micro), strict=True))
        for index, (part_inputs, part_targets) in enumerate(parts):
            # weighted by rows: the step's gradient is that of the whole batch's mean loss
            share = len(part_targets) / len(targets)
            with _gradient_sync(self.model, sync=index == len(parts) - 1):
                with _autocast(self.cfg, self.device):
                    loss = self.task.loss(self.model(part_inputs), part_targets)
                (loss * share).backward()
            progress.loss_sum += loss.detach().double() * len(part_targets)
        progress.rows += len(targets)
        freeze = self.cfg.train.freeze
        if freeze and (freeze.epochs is None or progress.epoch <= freeze.epochs):
            for parameter in self.frozen:  # no gradient: the optimizer leaves it alone
                parameter.grad = None
        if self.cfg.train.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_step()
        progress.steps += 1

    def _epoch_training(self, progress: EpochProgress) -> EpochTraining:
        """The finished epoch's loss, rows and times over all ranks; paces the
        preemption watch by this epoch's mean step."""
        seconds = time.monotonic() - progress.started
        loss_sum, rows, rank_seconds, rank_waits = _all_reduce_sum(
            [progress.loss_sum.item(), progress.rows, seconds, progress.data_wait_s], self.device
        )
        steps = max(progress.steps - progress.first_step, 1)
        self.watch.pace(rank_seconds / self.world_size / steps)
        # with what the steps before a restart trained, if it restarted in this epoch
        loss_sum, rows = loss_sum + progress.carried[0], rows + progress.carried[1]
        return EpochTraining(
            loss=loss_sum / max(rows, 1),
            rows=rows,
            seconds=seconds + progress.carried[2],
            data_wait_s=rank_waits / self.world_size,
            started=progress.started,
        )

    def validate(self, shard: ray.data.DataIterator) -> dict[str, float]:
        """Loss and metrics on the validation split, over all ranks: ``val_loss`` and
        ``val_<metric>`` for each of the task's validation metrics."""
        self.model.eval()
        metrics = self.task.validation_metrics().to(self.device)
        loss_sum, rows = 0.0, 0
        with torch.no_grad():
            for batch in shard.iter_torch_batches(
                batch_size=4 * self.cfg.train.batch_size, dtypes=self.dtypes, device=self.device
            ):
                with _autocast(self.cfg, self.device):
                    outputs = self.model(batch["inputs"])
                targets = batch["target"]
                loss_sum += self.task.loss(outputs, targets).item() * len(targets)
                rows += len(targets)
                metrics.update(self.task.predict(outputs), targets)
        computed = {f"val_{name}": float(value) for name, value in metrics.compute().items()}
        total_loss, total_rows = _all_reduce_sum([loss_sum, rows], self.device)
        return {"val_loss": total_loss / max(total_rows, 1), **computed}

    def epoch_record(self, epoch: int, training: EpochTraining, scores: dict) -> dict:
        """The epoch's entry in the history: what is reported, tracked and checkpointed."""
        return {
            "epoch": epoch,
            "train_loss": training.loss,
            **scores,
            "lr": self.schedule.lr,
            "samples_per_s": training.rows / max(training.seconds, 1e-9),
            "epoch_s": time.monotonic() - training.started,
            "data_wait_s": training.data_wait_s,
            "workers": self.world_size,
            "global_batch": self.plan.global_batch(self.world_size),
        }

    def report_with_checkpoint(
        self,
        metrics: dict,
        kind: str,
        epoch: int,
        step: int = 0,
        carried: list[float] | None = None,
    ) -> None:
        """Report ``metrics`` on every rank, with rank 0's checkpoint of everything a
        restart needs; ``step`` > 0 is a checkpoint inside ``epoch``."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                state = self.checkpoint_state(kind, epoch, step, carried)
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            self.session.report(metrics, checkpoint=checkpoint)

    def checkpoint_state(
        self, kind: str, epoch: int, step: int, carried: list[float] | None
    ) -> dict:
        """Everything ``restore`` reads back: weights, optimizer, schedule, early
        stopping, where in the run it was written, history, restarts and tracking."""
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "base_lr": self.cfg.train.optimizer.lr,
            "early_stopping": self.stopper.state_dict(),
            "epoch": epoch,
            "step": step,
            "kind": kind,
            "carried": carried,
            "history": self.history,
            "restarts": self.restarts,
            "tracking": self.tracker.state,
            "saved_at": round(time.time(), 3),
            "deadline": self.watch.deadline,  # of a preemption notice, if one came
            # the longest preemption checkpoint so far: what the deadline's margin used
            "write_s": round(self.watch.checkpoint_s, 3),
        }

    def checkpoint_for_preemption(self, reason: str, progress: EpochProgress) -> None:
        """Checkpoint inside the epoch, with what its steps so far trained on all ranks,
        because a node is about to be reclaimed (``reason``: notice or deadline)."""
        saving = time.monotonic()
        so_far = _all_reduce_sum([progress.loss_sum.item(), progress.rows], self.device)
        carried = [
            progress.carried[0] + so_far[0],
            progress.carried[1] + so_far[1],
            progress.carried[2] + time.monotonic() - progress.started,
        ]
        marker = {"epoch": progress.epoch, "step": progress.steps, self.watched: float("nan")}
        self.report_with_checkpoint(
            marker, f"preemption {reason}", progress.epoch, progress.steps, carried
        )
        self.watch.took(time.monotonic() - saving)
        if self.rank == 0:
            logger.info(
                "preemption %s: checkpoint at step %d of epoch %d",
                reason,
                progress.steps,
                progress.epoch,
            )

    def track(self, record: dict) -> None:
        """Log the epoch to TensorBoard and MLflow (rank 0)."""
        if self.tracker:
            self.tracker.log_epoch(record)

    def log_epoch_line(self, record: dict, scores: dict) -> None:
        """The console's line for a finished epoch: losses, scores, speed, time and ETA."""
        epoch, max_epochs = record["epoch"], self.cfg.train.max_epochs
        elapsed = time.monotonic() - self.run_started
        eta = elapsed / (epoch - self.start_epoch + 1) * (max_epochs - epoch)
        scored = "  ".join(f"{name} {value:.4f}" for name, value in scores.items())
        logger.info(
            "epoch %d/%d  train_loss %.4f  %s  lr %.2e  %.0f samples/s  elapsed %s  eta %s",
            epoch,
            max_epochs,
            record["train_loss"],
            scored,
            record["lr"],
            record["samples_per_s"],
            format_seconds(elapsed),
            format_seconds(eta),
        )

    def log_early_stop(self) -> None:
        """The console's line saying why training stopped before ``max_epochs``."""
        logger.info(
            "early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
            self.watched,
            self.stopper.epochs_without_improvement,
            self.stopper.best,
            self.stopper.best_epoch,
        )

    def cleanup(self, status: str) -> None:
        """Close the tracked run with the run's status."""
        if self.tracker:
            self.tracker.close(status)
