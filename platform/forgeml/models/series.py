"""Forecasters over the windows of a series: (N, window, 2) inputs (the standardised
value and whether it was observed) to one output per horizon step.

Both read the window from oldest to newest and forecast from the state at its last step.
Their outputs are added to the naive forecast that the window holds (the last season
repeated, or the last value): they learn its correction, which starts them at a sound
forecast on little data and keeps trending series in range past the levels of training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from forgeml.config import RNNConfig, TransformerConfig
from forgeml.data.base import ModelInputs
from forgeml.models import register_model
from forgeml.models.blocks import encoder, recurrent


def naive_steps(window: int, horizon: int, season: int) -> np.ndarray:
    """For each horizon step, the window position the naive forecast repeats: the same
    point of the last season in the window, or (no season) the window's last value."""
    if season:
        return window - season + np.arange(horizon) % season
    return np.full(horizon, window - 1)


class NaiveForecast(nn.Module):
    """The (seasonal) naive forecast of each window, standardised like the window."""

    def __init__(self, inputs: ModelInputs, horizon: int):
        super().__init__()
        steps = naive_steps(inputs.shape[0], horizon, inputs.season)
        self.register_buffer("steps", torch.as_tensor(steps), persistent=False)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return windows[:, self.steps, 0]


#: Where a forecaster keeps its linear autoregression (``LinearAutoregression.linear``).
AUTOREGRESSION = "base.autoregression.linear"


class LinearAutoregression(nn.Module):
    """Each horizon step as a weighted sum of the window's values (carried forward where
    missing): the linear part of the forecast, in parallel with the network (LSTNet's
    autoregressive highway). It is built at zero, so a forecaster starts at the naive
    one; training starts it at the ridge regression of the training windows instead
    (``train/warm_start.py``)."""

    def __init__(self, inputs: ModelInputs, horizon: int):
        super().__init__()
        self.linear = nn.Linear(inputs.shape[0], horizon)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.linear(windows[..., 0])


class BaseForecast(nn.Module):
    """What the network's output is added to: the naive forecast, plus the linear
    autoregression when the model config asks for it."""

    def __init__(self, autoregressive: bool, inputs: ModelInputs, horizon: int):
        super().__init__()
        self.naive = NaiveForecast(inputs, horizon)
        self.autoregression = LinearAutoregression(inputs, horizon) if autoregressive else None

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        base = self.naive(windows)
        return base + self.autoregression(windows) if self.autoregression else base


class TransformerForecaster(nn.Module):
    def __init__(self, cfg: TransformerConfig, inputs: ModelInputs, num_outputs: int):
        super().__init__()
        steps, channels = inputs.shape
        self.project = nn.Linear(channels, cfg.d_model)
        self.positions = nn.Embedding(steps, cfg.d_model)
        self.encoder = encoder(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_outputs)
        self.base = BaseForecast(cfg.autoregressive, inputs, num_outputs)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(windows.shape[1], device=windows.device)
        hidden = self.encoder(self.project(windows) + self.positions(positions))
        return self.head(self.norm(hidden[:, -1])) + self.base(windows)


class RNNForecaster(nn.Module):
    def __init__(self, cfg: RNNConfig, inputs: ModelInputs, num_outputs: int):
        super().__init__()
        self.project = nn.Linear(inputs.shape[1], cfg.embedding_dim)
        self.rnn = recurrent(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden * (2 if cfg.bidirectional else 1), num_outputs)
        self.base = BaseForecast(cfg.autoregressive, inputs, num_outputs)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(self.project(windows))
        final = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); GRU: h
        # The last layer's final states: forward after the newest step, and (if
        # bidirectional) backward after the oldest, each having read the whole window.
        last = torch.cat([final[-2], final[-1]], -1) if self.rnn.bidirectional else final[-1]
        return self.head(self.dropout(last)) + self.base(windows)


@register_model("transformer", data="series")
def build_transformer_forecaster(cfg: TransformerConfig, inputs: ModelInputs, num_outputs: int):
    return TransformerForecaster(cfg, inputs, num_outputs)


@register_model("rnn", data="series")
def build_rnn_forecaster(cfg: RNNConfig, inputs: ModelInputs, num_outputs: int):
    return RNNForecaster(cfg, inputs, num_outputs)
