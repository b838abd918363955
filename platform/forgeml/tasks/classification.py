"""Single-label classification: cross-entropy, softmax probabilities, torchmetrics metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from forgeml.config import ClassificationTask as ClassificationConfig
from forgeml.data.base import TargetSpec
from forgeml.tasks import register_task

if TYPE_CHECKING:
    import torchmetrics


@register_task("classification")
class ClassificationTask:
    evaluation_batch_size = 512
    #: Test metrics a model must not lose to its baseline on (``forgeml.baselines``).
    headline_metrics = (("accuracy", "max"), ("auroc_ovr", "max"))
    target_dtype = torch.int64

    def __init__(self, cfg: ClassificationConfig, target: TargetSpec):
        self.cfg = cfg
        self.class_names = tuple(target.classes)
        self.num_outputs = len(self.class_names)
        self.class_weights = torch.tensor(target.class_weights) if target.class_weights else None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = None if self.class_weights is None else self.class_weights.to(logits.device)
        return nn.functional.cross_entropy(
            logits.float(), targets, weight=weights, label_smoothing=self.cfg.label_smoothing
        )

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities."""
        return torch.softmax(logits.float(), dim=-1)

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        """Cheap per-epoch metrics; they all-reduce across DDP ranks on ``compute()``."""
        from torchmetrics import MetricCollection
        from torchmetrics import classification as tmc

        k = self.num_outputs
        return MetricCollection(
            {
                "accuracy": tmc.MulticlassAccuracy(k, average="micro"),
                "macro_f1": tmc.MulticlassF1Score(k, average="macro"),
            }
        )

    def test_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics import classification as tmc

        k = self.num_outputs
        return MetricCollection(
            {
                "accuracy": tmc.MulticlassAccuracy(k, average="micro"),
                "macro_precision": tmc.MulticlassPrecision(k, average="macro"),
                "macro_recall": tmc.MulticlassRecall(k, average="macro"),
                "macro_f1": tmc.MulticlassF1Score(k, average="macro"),
                "auroc_ovr": tmc.MulticlassAUROC(k, average="macro"),
                "per_class_precision": tmc.MulticlassPrecision(k, average="none"),
                "per_class_recall": tmc.MulticlassRecall(k, average="none"),
                "per_class_f1": tmc.MulticlassF1Score(k, average="none"),
                "confusion_matrix": tmc.MulticlassConfusionMatrix(k),
            }
        )

    def report(self, computed: dict[str, torch.Tensor]) -> dict:
        """Computed test metrics as JSON-ready values, per-class ones keyed by class name."""
        out: dict = {}
        for name, value in computed.items():
            if name.startswith("per_class_"):
                out[name] = dict(zip(self.class_names, value.tolist(), strict=True))
            elif name == "confusion_matrix":
                out[name] = {"labels": list(self.class_names), "matrix": value.tolist()}
            else:
                out[name] = float(value)
        return out

    def row_outputs(self, predicted: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """What the reference statistics keep per row: the predicted probabilities."""
        return predicted.numpy()

    def prediction_records(self, probabilities: np.ndarray) -> list[dict]:
        """Per row: the most probable class, its probability, and every class's."""
        return [
            {
                "label": self.class_names[int(row.argmax())],
                "confidence": float(row.max()),
                "probabilities": dict(zip(self.class_names, row.tolist(), strict=True)),
            }
            for row in probabilities
        ]

    def drift_values(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        """Per row: the predicted class (categorical) and its probability."""
        return {
            "class": np.asarray(self.class_names, dtype=object)[probabilities.argmax(1)],
            "confidence": probabilities.max(1),
        }
