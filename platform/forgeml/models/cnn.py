"""A small configurable CNN: blocks of conv-BN-ReLU-conv-BN-ReLU-pool, then a linear head."""

from __future__ import annotations

import torch
from torch import nn

from forgeml.config import CNNConfig
from forgeml.data.base import ModelInputs
from forgeml.models import register_model


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig, in_channels: int, num_outputs: int):
        super().__init__()
        widths = [cfg.width * 2**i for i in range(cfg.depth)]
        blocks, channels = [], in_channels
        for width in widths:
            blocks.append(_block(channels, width))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(channels, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("cnn")
def build_cnn(cfg: CNNConfig, inputs: ModelInputs, num_outputs: int) -> CNN:
    if len(inputs.shape) != 3:
        raise ValueError(f"model cnn needs (channels, height, width) inputs, got {inputs.shape}")
    channels, height, width = inputs.shape
    if min(height, width) < 2**cfg.depth:
        raise ValueError(
            f"model.depth={cfg.depth} halves the {height}x{width} input {cfg.depth} times; "
            f"use depth <= {int(min(height, width)).bit_length() - 1}"
        )
    return CNN(cfg, channels, num_outputs)
