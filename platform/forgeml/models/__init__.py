"""Model registry: a config ``kind`` maps to a builder; adding a model adds one module.

What a model reads is stated by its config section (``ModelSection.reads``); a model with
one network per kind of data (the sequence models: a classifier of token ids, a
forecaster of series windows) registers a builder for each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from forgeml.config import ModelSection
from forgeml.data.base import InputReduction, ModelInputs

Builder = Callable[[ModelSection, ModelInputs, int], nn.Module]
_BUILDERS: dict[tuple[str, str | None], Builder] = {}


def register_model(kind: str, data: str | None = None):
    """Register ``builder(cfg, inputs: ModelInputs, num_outputs) -> nn.Module`` for model
    ``kind``: for every kind of data it reads, or (``data``) for that one."""

    def decorate(builder: Builder) -> Builder:
        _BUILDERS[(kind, data)] = builder
        return builder

    return decorate


def build_model(cfg: ModelSection, inputs: ModelInputs, num_outputs: int) -> nn.Module:
    """The module for a model config and the preprocessor's ``ModelInputs``: the config's
    network, behind the inputs' reduction where they have one."""
    if inputs.data not in cfg.reads:
        raise ValueError(f"model {cfg.kind} reads {' or '.join(cfg.reads)} data, not {inputs.data}")
    builder = _BUILDERS.get((cfg.kind, inputs.data)) or _BUILDERS[(cfg.kind, None)]
    if inputs.reduction is None:
        return builder(cfg, inputs, num_outputs)
    reduced = replace(inputs, shape=(inputs.reduction.width,), reduction=None)
    return ReducedInputs(inputs.reduction, builder(cfg, reduced, num_outputs))


class ReducedInputs(nn.Module):
    """A network that reads a table's selected columns or principal components: the
    fitted reduction applied to the encoded inputs, then the network. The reduction is
    part of the preprocessing, not a weight: it is not in the state dict and never trains.
    """

    def __init__(self, reduction: InputReduction, network: nn.Module):
        super().__init__()
        self.network = network
        offset = torch.tensor(reduction.offset, dtype=torch.float32)
        self.register_buffer("offset", offset, persistent=False)
        matrix = torch.tensor(reduction.matrix, dtype=torch.float32)
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network((inputs - self.offset) @ self.matrix)


def registered_models() -> list[str]:
    return sorted({kind for kind, _ in _BUILDERS})


# Importing the model modules registers them.
from forgeml.models import cnn, generative, mlp, series, text  # noqa: E402,F401
