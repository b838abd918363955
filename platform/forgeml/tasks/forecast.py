"""Forecasting a horizon of a series: one output per step, trained on values standardised
with the training split's statistics; a missing target value (NaN) is no target, so the
loss and every metric skip it. Predictions and metrics are in the series' units."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from forgeml.config import ForecastTask as ForecastConfig
from forgeml.data.base import TargetSpec
from forgeml.tasks import register_task
from forgeml.tasks.regression import LOSSES

if TYPE_CHECKING:
    import torchmetrics


@register_task("forecast")
class ForecastTask:
    evaluation_batch_size = 512
    #: Test metrics a model must not lose to its baseline on (``forgeml.baselines``).
    headline_metrics = (("rmse", "min"),)
    target_dtype = torch.float32

    def __init__(self, cfg: ForecastConfig, target: TargetSpec):
        self.cfg = cfg
        self.target = target
        self.num_outputs = target.horizon
        self.criterion = LOSSES[cfg.loss](reduction="none")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        observed = torch.isfinite(targets)
        standardised = (targets.float() - self.target.mean) / self.target.std
        losses = self.criterion(outputs.float(), torch.where(observed, standardised, 0.0))
        return (losses * observed).sum() / observed.sum().clamp(min=1)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Each horizon step's value, in the series' units."""
        return outputs.float() * self.target.std + self.target.mean

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics import regression as tmr

        from forgeml.tasks.metrics import RMSE, Observed

        return MetricCollection(
            {"rmse": Observed(RMSE()), "mae": Observed(tmr.MeanAbsoluteError())}
        )

    def test_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics import regression as tmr

        from forgeml.tasks.metrics import RMSE, Observed

        return MetricCollection(
            {
                "rmse": Observed(RMSE()),
                "mae": Observed(tmr.MeanAbsoluteError()),
                "mape": Observed(tmr.MeanAbsolutePercentageError()),
            }
        )

    def report(self, computed: dict[str, torch.Tensor]) -> dict:
        return {name: float(value) for name, value in computed.items()}

    def row_outputs(self, predicted: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """What the reference statistics keep per row: the forecast."""
        return predicted.numpy()

    def prediction_records(self, forecasts: np.ndarray) -> list[dict]:
        return [{"forecast": row.tolist()} for row in forecasts]

    def drift_values(self, forecasts: np.ndarray) -> dict[str, np.ndarray]:
        """Per window: the mean of its forecast over the horizon."""
        return {"forecast_mean": forecasts.mean(1)}
