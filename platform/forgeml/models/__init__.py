"""Model registry: a config ``kind`` maps to a builder; adding a model adds one module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(kind: str):
    """Register ``builder(cfg, inputs: ModelInputs, num_outputs) -> nn.Module``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[kind] = builder
        return builder

    return decorate


def build_model(cfg, inputs, num_outputs: int) -> nn.Module:
    """The module for a model config and the preprocessor's ``ModelInputs``."""
    return _BUILDERS[cfg.kind](cfg, inputs, num_outputs)


def registered_models() -> list[str]:
    return sorted(_BUILDERS)


# Importing the model modules registers them.
from forgeml.models import cnn, generative, mlp, text  # noqa: E402,F401
