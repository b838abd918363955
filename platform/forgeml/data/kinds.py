"""Every data kind, imported so that each registers its halves (``base``), and the
lookups that need them all: the features a config names, and a stored fitted state."""

from __future__ import annotations

from forgeml.config import ExperimentConfig
from forgeml.data import images, series, tabular, text  # noqa: F401  registers each kind
from forgeml.data.base import FEATURES, PREPROCESSORS, Features, Preprocessor


def build_features(cfg: ExperimentConfig) -> Features:
    """The ``Features`` of a table source's ``data.features``."""
    return FEATURES[cfg.data.features.kind](cfg)


def preprocessor_from_dict(state: dict) -> Preprocessor:
    """Rebuild a stored ``preprocessor.json``."""
    kind = state.get("kind")
    if kind not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor kind {kind!r}; known: {sorted(PREPROCESSORS)}")
    return PREPROCESSORS[kind].from_dict(state)
