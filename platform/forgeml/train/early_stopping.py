"""Early stopping on a validation metric: patience, mode and minimum improvement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from forgeml.config import EarlyStoppingConfig


@dataclass
class EarlyStopping:
    cfg: EarlyStoppingConfig
    best: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.mode == "min":
            return value < self.best - self.cfg.min_delta
        return value > self.best + self.cfg.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record the epoch's metric; True when training should stop."""
        if self.improved(value):
            self.best, self.best_epoch, self.epochs_without_improvement = value, epoch, 0
        else:
            self.epochs_without_improvement += 1
        return self.cfg.enabled and self.epochs_without_improvement >= self.cfg.patience

    def state_dict(self) -> dict:
        state = asdict(self)
        state.pop("cfg")
        return state

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
