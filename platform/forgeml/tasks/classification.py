"""Single-label classification: cross-entropy, softmax probabilities, torchmetrics metrics."""

from __future__ import annotations

import torch
import torchmetrics
from torch import nn
from torchmetrics import classification as tmc

from forgeml.config import ClassificationTask as ClassificationConfig
from forgeml.tasks import register_task


@register_task("classification")
class ClassificationTask:
    def __init__(self, cfg: ClassificationConfig, class_names: tuple[str, ...]):
        self.cfg = cfg
        self.class_names = tuple(class_names)
        self.num_outputs = len(class_names)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float(), targets)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities."""
        return torch.softmax(logits.float(), dim=-1)

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        """Cheap per-epoch metrics; they all-reduce across DDP ranks on ``compute()``."""
        k = self.num_outputs
        return torchmetrics.MetricCollection(
            {
                "accuracy": tmc.MulticlassAccuracy(k, average="micro"),
                "macro_f1": tmc.MulticlassF1Score(k, average="macro"),
            }
        )

    def test_metrics(self) -> torchmetrics.MetricCollection:
        k = self.num_outputs
        return torchmetrics.MetricCollection(
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
