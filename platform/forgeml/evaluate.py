"""Evaluation of a trained model on a held-out split, and the reference statistics for drift."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray.data
import torch

from forgeml.data.preprocessing import WaferPreprocessor
from forgeml.train.loop import BATCH_DTYPES

DEFECT_CODE = 2
HISTOGRAM_BINS = 10


@dataclass
class Evaluation:
    metrics: dict
    probabilities: np.ndarray
    labels: np.ndarray
    defect_fraction: np.ndarray


def evaluate(
    model: torch.nn.Module,
    task,
    dataset: ray.data.Dataset,
    preprocessor: WaferPreprocessor,
    batch_size: int = 512,
) -> Evaluation:
    """Test metrics (torchmetrics) plus the per-row outputs the reference statistics need."""
    model.eval()
    metrics = task.test_metrics()
    probabilities, labels, defect_fraction = [], [], []
    defect_value = (DEFECT_CODE - preprocessor.mean) / preprocessor.std
    with torch.no_grad():
        for batch in dataset.iter_torch_batches(batch_size=batch_size, dtypes=BATCH_DTYPES):
            probs = task.predict(model(batch["image"]))
            metrics.update(probs, batch["label"])
            probabilities.append(probs.numpy())
            labels.append(batch["label"].numpy())
            defects = torch.isclose(batch["image"], torch.tensor(defect_value), atol=1e-3)
            defect_fraction.append(defects.flatten(1).float().mean(1).numpy())
    return Evaluation(
        metrics=task.report(metrics.compute()),
        probabilities=np.concatenate(probabilities),
        labels=np.concatenate(labels),
        defect_fraction=np.concatenate(defect_fraction),
    )


def _histogram(values: np.ndarray, low: float, high: float) -> dict:
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(low, high))
    return {"edges": edges.round(6).tolist(), "counts": counts.tolist()}


def reference_statistics(evaluation: Evaluation, class_names: tuple[str, ...]) -> dict:
    """What the inputs and predictions looked like at training time, for drift tests."""
    k = len(class_names)
    predicted = evaluation.probabilities.argmax(1)
    return {
        "rows": int(len(evaluation.labels)),
        "inputs": {"defect_fraction": _histogram(evaluation.defect_fraction, 0.0, 1.0)},
        "predictions": {
            "class_share": dict(
                zip(
                    class_names,
                    (np.bincount(predicted, minlength=k) / len(predicted)).tolist(),
                    strict=True,
                )
            ),
            "confidence": _histogram(evaluation.probabilities.max(1), 0.0, 1.0),
        },
        "labels": {
            "class_share": dict(
                zip(
                    class_names,
                    (np.bincount(evaluation.labels, minlength=k) / len(evaluation.labels)).tolist(),
                    strict=True,
                )
            )
        },
    }
