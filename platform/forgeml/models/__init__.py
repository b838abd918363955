"""Model registry: a config ``kind`` maps to a builder; adding a model adds one module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(kind: str):
    """Register ``builder(cfg, input_shape, num_outputs) -> nn.Module`` under ``kind``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[kind] = builder
        return builder

    return decorate


def build_model(cfg, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The module for a model config; ``input_shape`` excludes the batch dimension."""
    return _BUILDERS[cfg.kind](cfg, input_shape, num_outputs)


def registered_models() -> list[str]:
    return sorted(_BUILDERS)


# Importing the model modules registers them.
from forgeml.models import cnn  # noqa: E402,F401
