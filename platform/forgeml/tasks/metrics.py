"""forgeml's own torchmetrics metrics, for the tasks that need them.

The task modules import this module, and torchmetrics, only where they build metrics:
a process that only predicts (a model replica) then never imports torchmetrics, whose
import pulls SciPy's signal module and matplotlib with it (1-2 CPU-seconds a process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchmetrics
from torchmetrics.aggregation import MeanMetric
from torchmetrics.regression import MeanSquaredError
from torchmetrics.wrappers.abstract import WrapperMetric


class RMSE(MeanSquaredError):
    def __init__(self):
        super().__init__(squared=False)


class Observed(WrapperMetric):
    """A regression metric over the target values that were observed (not NaN); the
    wrapped metric keeps the state and synchronises it across ranks."""

    def __init__(self, metric: torchmetrics.Metric):
        super().__init__()
        self.metric = metric

    @staticmethod
    def _observed(preds: torch.Tensor, target: torch.Tensor):
        observed = torch.isfinite(target)
        return preds[observed], target[observed]

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.metric.update(*self._observed(preds, target))

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.metric(*self._observed(preds, target))

    def compute(self) -> torch.Tensor:
        return self.metric.compute()

    def reset(self) -> None:
        self.metric.reset()
        super().reset()


class RowMean(MeanMetric):
    """The mean over rows of a per-row quantity of (predicted, targets); synchronised
    across ranks like any torchmetrics metric."""

    def __init__(self, per_row: Callable[[tuple, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.per_row = per_row

    def update(self, predicted: tuple, targets: torch.Tensor) -> None:
        super().update(self.per_row(predicted, targets))
