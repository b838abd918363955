"""Optimizers and learning-rate schedules built from config.

A schedule advances after every optimizer step (warm-up and cosine need step
resolution), after every epoch (step decay), or on the validation metric (plateau);
``LRSchedule`` hides which, so the loop calls both hooks and stays one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from forgeml.config import (
    ConstantSchedule,
    CosineSchedule,
    OptimizerConfig,
    PlateauSchedule,
    StepSchedule,
)


def build_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> None:
    """Set weight decay, momentum and betas from ``cfg`` on a restored optimizer, whose state
    dict brought the values of the run that saved it."""
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
        if "betas" in group:
            group["betas"] = cfg.betas


class LRSchedule:
    """Wraps one torch scheduler with per-step and per-epoch hooks."""

    def __init__(self, cfg, optimizer, steps_per_epoch: int, max_epochs: int, metric_mode: str):
        self.cfg = cfg
        self.optimizer = optimizer
        if isinstance(cfg, CosineSchedule):
            warmup = max(int(cfg.warmup_epochs * steps_per_epoch), 0)
            total = max(steps_per_epoch * max_epochs, warmup + 1)

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = min((step - warmup) / max(total - warmup, 1), 1.0)
                cosine = 0.5 * (1 + math.cos(math.pi * progress))
                return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif isinstance(cfg, StepSchedule):
            self.scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=cfg.step_epochs, gamma=cfg.gamma
            )
        elif isinstance(cfg, PlateauSchedule):
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=metric_mode, factor=cfg.factor, patience=cfg.patience
            )
        elif isinstance(cfg, ConstantSchedule):
            self.scheduler = None
        else:
            raise TypeError(f"unknown schedule {cfg!r}")

    def after_step(self) -> None:
        if isinstance(self.cfg, CosineSchedule):
            self.scheduler.step()

    def after_epoch(self, metric: float) -> None:
        if isinstance(self.cfg, StepSchedule):
            self.scheduler.step()
        elif isinstance(self.cfg, PlateauSchedule):
            self.scheduler.step(metric)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def rescale(self, factor: float) -> None:
        """Scale the current and the base learning rate by ``factor``: the schedule goes
        on from where it was, relative to a new peak lr."""
        if factor == 1:
            return
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler:
            self.scheduler.load_state_dict(state)


@dataclass(frozen=True)
class BatchPlan:
    """How each rank batches an epoch at one world size.

    The rule for elastic runs: ``train.batch_size`` is one worker's batch at the most
    workers the run allows, so every optimizer step averages the gradients of
    ``batch_size * max_workers`` rows (the global batch). With fewer workers each rank
    reads ``step_rows`` rows per step and adds up the gradients of ``accumulate``
    micro-batches of them, none larger than ``batch_size`` (memory stays what one worker
    was sized for). The learning rate, the schedule and the steps per epoch then stay the
    same whatever the size, so a resize changes how fast a run goes, not what it learns.
    Layers that normalise by batch statistics (BatchNorm) see micro-batches, as each DDP
    rank's BatchNorm sees its own batch.
    """

    micro_batch: int
    accumulate: int
    steps_per_epoch: int

    @classmethod
    def for_world(
        cls, batch_size: int, max_workers: int, world_size: int, train_rows: int
    ) -> BatchPlan:
        accumulate = math.ceil(max_workers / world_size)
        micro_batch = math.ceil(batch_size * max_workers / (world_size * accumulate))
        micro_batches = math.ceil(math.ceil(train_rows / world_size) / micro_batch)
        return cls(micro_batch, accumulate, max(math.ceil(micro_batches / accumulate), 1))

    @property
    def step_rows(self) -> int:
        """Rows one rank reads per optimizer step."""
        return self.micro_batch * self.accumulate

    def global_batch(self, world_size: int) -> int:
        return self.step_rows * world_size
