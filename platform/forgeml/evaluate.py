"""Evaluation of a trained model on a held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray.data
import torch

from forgeml.console import progress
from forgeml.data.base import Preprocessor
from forgeml.tasks import Task, batch_dtypes

#: Rows a generating task decodes together.
GENERATION_BATCH = 256


@dataclass
class Evaluation:
    metrics: dict
    predictions: np.ndarray  # per row: class probabilities, values, or a text's log perplexity
    targets: np.ndarray
    inputs: dict[str, np.ndarray]  # the preprocessor's input summary, per row


def evaluate(
    model: torch.nn.Module,
    task: Task,
    dataset: ray.data.Dataset,
    preprocessor: Preprocessor,
) -> Evaluation:
    """Test metrics (torchmetrics) plus the per-row outputs and input summaries that the
    reference statistics for drift monitoring are made of."""
    model.eval()
    metrics = task.test_metrics()
    predictions, targets, inputs = [], [], []
    with torch.no_grad():
        dtypes = batch_dtypes(task, preprocessor.model_inputs)
        batches = dataset.iter_torch_batches(batch_size=task.evaluation_batch_size, dtypes=dtypes)
        for batch in progress(batches, "scoring the test split"):
            predicted = task.predict(model(batch["inputs"]))
            metrics.update(predicted, batch["target"])
            predictions.append(task.row_outputs(predicted, batch["target"]))
            targets.append(batch["target"].numpy())
            inputs.append(preprocessor.input_summary(batch["inputs"].numpy()))
    report = task.report(metrics.compute())
    if task.cfg.writes_text:  # tasks that write text score what they write
        batches = dataset.iter_batches(batch_size=GENERATION_BATCH, batch_format="numpy")
        report |= task.generation_metrics(model, batches, preprocessor)
    return Evaluation(
        metrics=report,
        predictions=np.concatenate(predictions),
        targets=np.concatenate(targets),
        inputs={name: np.concatenate([part[name] for part in inputs]) for name in inputs[0]},
    )
