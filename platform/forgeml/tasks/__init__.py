"""Task registry: what a task's head predicts, its loss, its metrics and its predictions.

A task is built from its config and the ``TargetSpec`` fitted with the data, and offers:
``num_outputs``, ``target_dtype``, ``loss``, ``predict`` (outputs to probabilities or
values in the target's units), ``validation_metrics``/``test_metrics`` (torchmetrics),
``report`` (computed metrics as JSON), ``row_outputs`` (what evaluation keeps per row),
``drift_values`` (per row, from those outputs: what drift tests compare; a served task's
outputs are its ``predict`` results), ``headline_metrics`` (the test metrics and their
direction on which a model must not lose to its baseline; empty where no baseline
applies) and, for tasks that are served, ``prediction_records`` (what a client receives).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from forgeml.data.preprocessing import ModelInputs

_TASKS: dict[str, Callable] = {}


def register_task(kind: str):
    def decorate(cls):
        _TASKS[kind] = cls
        return cls

    return decorate


def build_task(cfg, target):
    """The task for a task config and the fitted ``TargetSpec``."""
    return _TASKS[cfg.kind](cfg, target)


def batch_dtypes(task, inputs: ModelInputs) -> dict[str, torch.dtype]:
    """Tensor types of a batch's model inputs and target, for training and evaluation alike."""
    return {"inputs": getattr(torch, inputs.dtype), "target": task.target_dtype}


from forgeml.tasks import (  # noqa: E402,F401
    classification,
    forecast,
    generative,
    language_model,
    regression,
    seq2seq,
)
