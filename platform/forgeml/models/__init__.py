"""Model registry: a config ``kind`` maps to a builder; adding a model adds one module.

What a model reads is stated by its config section (``ModelSection.reads``); a model with
one network per kind of data (the sequence models: a classifier of token ids, a
forecaster of series windows) registers a builder for each.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from forgeml.config import ModelSection
from forgeml.data.base import ModelInputs

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
    """The module for a model config and the preprocessor's ``ModelInputs``."""
    if inputs.data not in cfg.reads:
        raise ValueError(f"model {cfg.kind} reads {' or '.join(cfg.reads)} data, not {inputs.data}")
    builder = _BUILDERS.get((cfg.kind, inputs.data)) or _BUILDERS[(cfg.kind, None)]
    return builder(cfg, inputs, num_outputs)


def registered_models() -> list[str]:
    return sorted({kind for kind, _ in _BUILDERS})


# Importing the model modules registers them.
from forgeml.models import cnn, generative, mlp, series, text  # noqa: E402,F401
