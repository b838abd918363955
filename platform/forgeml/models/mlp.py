"""A multilayer perceptron over flat features (tables, or any input, flattened)."""

from __future__ import annotations

import math

from torch import nn

from forgeml.config import MLPConfig
from forgeml.data.base import ModelInputs
from forgeml.models import register_model


@register_model("mlp")
def build_mlp(cfg: MLPConfig, inputs: ModelInputs, num_outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(inputs.shape)
    for hidden in cfg.hidden:
        layers.append(nn.Linear(width, hidden, bias=not cfg.batch_norm))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(inplace=True), nn.Dropout(cfg.dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
