"""Task registry: what a task's head predicts, its loss, its metrics and its predictions.

A task's config section (``forgeml.config.tasks``) states what it can do: its metrics,
its data, whether it is served, draws images or writes text. Its implementation here is
registered under the same ``kind`` and built from that config and the ``TargetSpec``
fitted with the data. ``Task`` is what every task offers; ``ServedTask``, ``TextWriter``
and ``ImageDrawer`` what the tasks whose config says ``served``, ``writes_text`` or
``draws_images`` offer besides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from forgeml.config import TaskSection
from forgeml.data.base import ModelInputs, TargetSpec

if TYPE_CHECKING:  # imported where metrics are built (forgeml.tasks.metrics says why)
    import torchmetrics


class Task(Protocol):
    """What training, evaluation, the baselines and drift monitoring ask of every task."""

    cfg: TaskSection
    #: Head outputs per row.
    num_outputs: int
    #: The dtype of a batch's ``target``.
    target_dtype: torch.dtype
    #: Rows scored together when evaluating.
    evaluation_batch_size: int
    #: Test metrics and their direction on which a model must not lose to its baseline
    #: (``forgeml.baselines``); empty where no simple baseline applies.
    headline_metrics: tuple[tuple[str, str], ...]

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor: ...

    def predict(self, outputs: Any) -> Any:
        """Head outputs to probabilities or values in the target's units."""

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        """Cheap per-epoch metrics, named as ``cfg.metrics`` without ``val_``."""

    def test_metrics(self) -> torchmetrics.MetricCollection: ...

    def report(self, computed: dict[str, torch.Tensor]) -> dict:
        """Computed test metrics as JSON."""

    def row_outputs(self, predicted: Any, targets: torch.Tensor) -> np.ndarray:
        """What evaluation keeps per row."""

    def drift_values(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Per row, from ``row_outputs``: what drift tests compare."""


class ServedTask(Task, Protocol):
    def prediction_records(self, outputs: np.ndarray) -> list[dict]:
        """What a client of /predict receives per instance."""


class TextWriter(Task, Protocol):
    #: Tokens ``forgeml generate`` samples from, unless told otherwise.
    default_top_k: int

    def sample(self, model: nn.Module, preprocessor, prompts: list[str], **how) -> list[str]: ...

    def generation_metrics(
        self, model: nn.Module, batches: Iterable[dict[str, np.ndarray]], preprocessor
    ) -> dict[str, float]:
        """Scores of what the model writes for the test rows."""


class ImageDrawer(Task, Protocol):
    def draw(self, model: nn.Module, count: int, generator: torch.Generator) -> np.ndarray: ...

    def sample_report(
        self, model: nn.Module, test_maps: np.ndarray, judge
    ) -> tuple[dict, dict[str, bytes]]:
        """Metrics of drawn images and the package files that show them."""


_TASKS: dict[str, Callable[[TaskSection, TargetSpec], Task]] = {}


def register_task(kind: str):
    """Register the implementation of the task config variant of this ``kind``."""

    def decorate(cls):
        _TASKS[kind] = cls
        return cls

    return decorate


def build_task(cfg: TaskSection, target: TargetSpec) -> Task:
    """The task for a task config and the fitted ``TargetSpec``."""
    return _TASKS[cfg.kind](cfg, target)


def registered_tasks() -> list[str]:
    return sorted(_TASKS)


def batch_dtypes(task: Task, inputs: ModelInputs) -> dict[str, torch.dtype]:
    """Tensor types of a batch's model inputs and target, for training and evaluation alike."""
    return {"inputs": getattr(torch, inputs.dtype), "target": task.target_dtype}


from forgeml.tasks import (  # noqa: E402,F401  importing the implementations registers them
    classification,
    forecast,
    generative,
    language_model,
    regression,
    seq2seq,
)
