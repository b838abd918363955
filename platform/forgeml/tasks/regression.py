"""Regression of one number: the model learns the target standardised with the training
split's mean and standard deviation; predictions and metrics are in the target's units."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from forgeml.config import RegressionTask as RegressionConfig
from forgeml.data.base import TargetSpec
from forgeml.tasks import register_task

if TYPE_CHECKING:
    import torchmetrics

LOSSES = {"mse": nn.MSELoss, "huber": nn.HuberLoss, "l1": nn.L1Loss}


@register_task("regression")
class RegressionTask:
    evaluation_batch_size = 512
    #: Test metrics a model must not lose to its baseline on (``forgeml.baselines``).
    headline_metrics = (("rmse", "min"),)
    target_dtype = torch.float32
    num_outputs = 1

    def __init__(self, cfg: RegressionConfig, target: TargetSpec):
        self.cfg = cfg
        self.target = target
        self.criterion = LOSSES[cfg.loss]()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        standardised = (targets.float() - self.target.mean) / self.target.std
        return self.criterion(outputs.float().squeeze(-1), standardised)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Predicted values in the target's units."""
        return outputs.float().squeeze(-1) * self.target.std + self.target.mean

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics import regression as tmr

        from forgeml.tasks.metrics import RMSE

        return MetricCollection(
            {"rmse": RMSE(), "mae": tmr.MeanAbsoluteError(), "r2": tmr.R2Score()}
        )

    def test_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics import regression as tmr

        from forgeml.tasks.metrics import RMSE

        return MetricCollection(
            {
                "mse": tmr.MeanSquaredError(),
                "rmse": RMSE(),
                "mae": tmr.MeanAbsoluteError(),
                "mape": tmr.MeanAbsolutePercentageError(),
                "r2": tmr.R2Score(),
            }
        )

    def report(self, computed: dict[str, torch.Tensor]) -> dict:
        return {name: float(value) for name, value in computed.items()}

    def row_outputs(self, predicted: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """What the reference statistics keep per row: the predicted values."""
        return predicted.numpy()

    def prediction_records(self, values: np.ndarray) -> list[dict]:
        return [{"value": float(value)} for value in values]

    def drift_values(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {"value": values}
