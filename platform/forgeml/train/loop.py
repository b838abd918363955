"""The per-worker training loop run by Ray Train on every DDP rank.

Reads top to bottom: build the model, optimizer and schedule from the config; restore
the latest checkpoint if one is handed over (a restarted worker group, ``--resume``, or
a Population Based Training trial continuing from another's); then per epoch train on
this rank's shard, validate, decide on early stopping, and report metrics with a
checkpoint. All ranks take the same decisions because every number they decide on is
all-reduced first.

The loop reaches Ray only through a ``WorkerSession``: ``RayTrainSession`` on a Ray
Train worker, or a Tune trial's own session when a search trains in-process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
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
from forgeml.console import configure_worker_logging
from forgeml.data.preprocessing import ModelInputs, TargetSpec
from forgeml.models import build_model
from forgeml.tasks import build_task
from forgeml.tracking import EpochLogger
from forgeml.train.augment import augment_batch
from forgeml.train.early_stopping import EarlyStopping
from forgeml.train.optim import BatchPlan, LRSchedule, apply_hyperparameters, build_optimizer
from forgeml.train.preemption import PreemptionWatch

logger = logging.getLogger("forgeml.train")

CHECKPOINT_FILE = "state.pt"


def batch_dtypes(task, inputs: ModelInputs) -> dict[str, torch.dtype]:
    """Tensor types of a batch's model inputs and target."""
    return {"inputs": getattr(torch, inputs.dtype), "target": task.target_dtype}


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


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


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
        ray.train.report(metrics, checkpoint=checkpoint)

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


def train_loop_per_worker(config: dict) -> dict:
    """The TorchTrainer's entry point on every rank."""
    return train_worker(config, RayTrainSession())


def train_worker(config: dict, session: WorkerSession) -> dict:
    """Train one rank. Returns (on every rank) the run's status and per-epoch history."""
    configure_worker_logging()
    cfg = ExperimentConfig.model_validate(config["experiment"])
    rank, world_size, device = session.rank, session.world_size, session.device
    torch.set_num_threads(cfg.scaling.torch_threads or max(int(cfg.scaling.cpus_per_worker), 1))

    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, TargetSpec.from_dict(config["target"]))
    inputs = ModelInputs.from_dict(config["inputs"])
    dtypes = batch_dtypes(task, inputs)
    model = build_model(cfg.model, inputs, task.num_outputs)
    start = {name: torch.tensor(value) for name, value in config["initial_weights"].items()}
    unknown = model.load_state_dict(start, strict=False).unexpected_keys
    if unknown:
        raise ValueError(f"initial weights for parameters the model lacks: {unknown}")
    model = session.prepare_model(model)
    ranks = _ranks(rank, world_size)
    torch.manual_seed(cfg.seed * 1000 + rank)
    optimizer = build_optimizer(cfg.train.optimizer, model.parameters())
    plan = BatchPlan.for_world(
        cfg.train.batch_size, cfg.scaling.max_workers, world_size, config["train_rows"]
    )
    # The schedule counts steps at the largest size, the same at every size it restarts at.
    largest = BatchPlan.for_world(
        cfg.train.batch_size, cfg.scaling.max_workers, cfg.scaling.max_workers, config["train_rows"]
    )
    schedule = LRSchedule(
        cfg.train.schedule,
        optimizer,
        steps_per_epoch=largest.steps_per_epoch,
        max_epochs=cfg.train.max_epochs,
        metric_mode=cfg.train.early_stopping.mode,
    )
    stopper = EarlyStopping(cfg.train.early_stopping)
    history: list[dict] = []
    restarts: list[dict] = []  # every restart of this run from a checkpoint, in order
    start_epoch, done_steps = 1, 0  # done_steps: of start_epoch, by a preemption checkpoint
    carried = [0.0, 0.0, 0.0]  # loss sum, rows and seconds of those steps, all ranks

    checkpoint = session.checkpoint()
    tracked = None  # the restored run's tracking state
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        # The checkpoint may come from a trial with other values (PBT): ours apply from here.
        # Checkpoints written before base_lr was recorded were saved at this run's lr.
        schedule.rescale(cfg.train.optimizer.lr / state.get("base_lr", cfg.train.optimizer.lr))
        apply_hyperparameters(optimizer, cfg.train.optimizer)
        stopper.load_state_dict(state["early_stopping"])
        history = state["history"]
        done_steps = state.get("step", 0)
        start_epoch = state["epoch"] + (0 if done_steps else 1)
        carried = state.get("carried", carried)
        restarts = [
            *state.get("restarts", []),
            {
                "epoch": state["epoch"],
                "step": done_steps,
                "checkpoint": state.get("kind", "epoch"),
                "saved_at": state.get("saved_at"),
                "deadline": state.get("deadline"),
                "write_s": state.get("write_s"),
                "resumed_at": round(time.time(), 3),
                "workers": world_size,
            },
        ]
        tracked = state.get("tracking")
        if rank == 0:
            where = f"step {done_steps} of epoch" if done_steps else "the end of epoch"
            logger.info(
                "resumed from the checkpoint at %s %d with %d worker(s)",
                where,
                state["epoch"],
                world_size,
            )
    tracker = EpochLogger(config["tracking"], cfg, tracked, start_epoch) if rank == 0 else None

    watch = PreemptionWatch(session, cfg.train.preemption)

    def save(kind: str, epoch: int, step: int, metrics: dict, partial=None) -> None:
        """Report ``metrics`` on every rank, with rank 0's checkpoint of everything a
        restart needs; ``step`` > 0 is a checkpoint inside ``epoch``."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "base_lr": cfg.train.optimizer.lr,
                    "early_stopping": stopper.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "kind": kind,
                    "carried": partial,
                    "history": history,
                    "restarts": restarts,
                    "tracking": tracker.state,
                    "saved_at": round(time.time(), 3),
                    "deadline": watch.deadline,  # of a preemption notice, if one came
                    # the longest preemption checkpoint so far: what the deadline's margin used
                    "write_s": round(watch.checkpoint_s, 3),
                }
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            session.report(metrics, checkpoint=checkpoint)

    train_shard = session.dataset("train")
    val_shard = session.dataset("val")
    watched = cfg.train.early_stopping.metric
    run_started = time.monotonic()
    status = "completed"

    try:
        for epoch in range(start_epoch, cfg.train.max_epochs + 1):
            epoch_started = time.monotonic()
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            # A resumed epoch trains the steps it had left, on a fresh pass of the shard.
            first_step = done_steps if epoch == start_epoch else 0
            before = carried if first_step else [0.0, 0.0, 0.0]
            steps = first_step
            augmenting = config["augment"]
            if augmenting:
                generator = augmentation_generator(cfg.seed, epoch, rank, device)
            optimizer.zero_grad(set_to_none=True)
            data_wait, fetch_started = 0.0, time.monotonic()
            for batch in train_shard.iter_torch_batches(
                batch_size=plan.step_rows,
                dtypes=dtypes,
                device=device,
                local_shuffle_buffer_size=4 * plan.step_rows,
                local_shuffle_seed=shuffle_seed(cfg.seed, epoch, rank),
            ):
                if first_step and steps >= plan.steps_per_epoch:
                    break
                step_started = time.monotonic()
                data_wait += step_started - fetch_started
                inputs, targets = batch["inputs"], batch["target"]
                if augmenting:
                    inputs, targets = augment_batch(
                        inputs, targets, **augmenting, generator=generator
                    )
                micro = plan.micro_batch
                parts = list(zip(inputs.split(micro), targets.split(micro), strict=True))
                for index, (part_inputs, part_targets) in enumerate(parts):
                    # weighted by rows: the step's gradient is that of the whole batch's mean loss
                    share = len(part_targets) / len(targets)
                    with _gradient_sync(model, sync=index == len(parts) - 1):
                        with _autocast(cfg, device):
                            loss = task.loss(model(part_inputs), part_targets)
                        (loss * share).backward()
                    loss_sum += loss.detach().double() * len(part_targets)
                seen += len(targets)
                if cfg.train.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.after_step()
                steps += 1
                reason = watch.ask(time.monotonic() - step_started)
                if reason:
                    saving = time.monotonic()
                    so_far = _all_reduce_sum([loss_sum.item(), seen], device)
                    partial = [
                        before[0] + so_far[0],
                        before[1] + so_far[1],
                        before[2] + time.monotonic() - epoch_started,
                    ]
                    marker = {"epoch": epoch, "step": steps, watched: float("nan")}
                    save(f"preemption {reason}", epoch, steps, marker, partial)
                    watch.took(time.monotonic() - saving)
                    if rank == 0:
                        logger.info(
                            "preemption %s: checkpoint at step %d of epoch %d", reason, steps, epoch
                        )
                fetch_started = time.monotonic()
            train_seconds = time.monotonic() - epoch_started
            total_loss, total_seen, rank_seconds, rank_waits = _all_reduce_sum(
                [loss_sum.item(), seen, train_seconds, data_wait], device
            )
            watch.pace(rank_seconds / world_size / max(steps - first_step, 1))
            # with what the steps before a restart trained, if it restarted in this epoch
            total_loss, total_seen = total_loss + before[0], total_seen + before[1]
            train_seconds += before[2]
            train_loss = total_loss / max(total_seen, 1)

            model.eval()
            metrics = task.validation_metrics().to(device)
            val_loss_sum, val_seen = 0.0, 0
            with torch.no_grad():
                for batch in val_shard.iter_torch_batches(
                    batch_size=4 * cfg.train.batch_size, dtypes=dtypes, device=device
                ):
                    with _autocast(cfg, device):
                        outputs = model(batch["inputs"])
                    targets = batch["target"]
                    val_loss_sum += task.loss(outputs, targets).item() * len(targets)
                    val_seen += len(targets)
                    metrics.update(task.predict(outputs), targets)
            computed = {k: float(v) for k, v in metrics.compute().items()}
            computed_names = [f"val_{name}" for name in computed]
            val_total, val_count = _all_reduce_sum([val_loss_sum, val_seen], device)

            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_total / max(val_count, 1),
                **{f"val_{name}": value for name, value in computed.items()},
                "lr": schedule.lr,
                "samples_per_s": total_seen / max(train_seconds, 1e-9),
                "epoch_s": time.monotonic() - epoch_started,
                "data_wait_s": rank_waits / world_size,
                "workers": world_size,
                "global_batch": plan.global_batch(world_size),
            }
            history.append(record)

            if not math.isfinite(train_loss) or not math.isfinite(record["val_loss"]):
                status = "diverged"
                session.report(record)
                if tracker:
                    tracker.log_epoch(record)
                break

            stop = stopper.update(record[watched], epoch)
            schedule.after_epoch(record[watched])
            record["best_epoch"] = stopper.best_epoch
            if tracker:
                tracker.log_epoch(record)
            save("epoch", epoch, 0, record)

            if rank == 0:
                elapsed = time.monotonic() - run_started
                done = epoch - start_epoch + 1
                eta = elapsed / done * (cfg.train.max_epochs - epoch)
                scores = "  ".join(
                    f"{name} {record[name]:.4f}" for name in ("val_loss", *computed_names)
                )
                logger.info(
                    "epoch %d/%d  train_loss %.4f  %s  lr %.2e  %.0f samples/s  elapsed %s  eta %s",
                    epoch,
                    cfg.train.max_epochs,
                    train_loss,
                    scores,
                    record["lr"],
                    record["samples_per_s"],
                    _format_seconds(elapsed),
                    _format_seconds(eta),
                )
            if stop:
                status = "early_stopped"
                if rank == 0:
                    logger.info(
                        "early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                        watched,
                        stopper.epochs_without_improvement,
                        stopper.best,
                        stopper.best_epoch,
                    )
                break
    except BaseException:
        if tracker:
            tracker.close("failed")
        raise
    if tracker:
        tracker.close(status)

    return {
        "status": status,
        "history": history,
        "restarts": restarts,
        "world_size": world_size,
        "ranks": ranks,
    }
