"""Shared test helpers: tiny experiment configs that train in seconds on a CPU."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from forgeml.config import ExperimentConfig, config_from_dict

REPO = Path(__file__).resolve().parents[1]

#: The files every registered model version holds (DESIGN.md's model package).
PACKAGE_FILES = {
    "config.yaml",
    "preprocessor.json",
    "model.pt",
    "metrics.json",
    "reference.json",
    "MODEL_CARD.md",
    "evaluation.npz",
    "report.html",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_raw_config(storage_root: str | Path, **sections) -> dict:
    """A raw (YAML-shaped) config: 16x16 maps, 30 per class, a 2-block CNN, 2 epochs."""
    raw = {
        "name": "tiny-wafer",
        "seed": 7,
        "storage": {"root": str(storage_root)},
        "data": {
            "source": {"kind": "wafer", "samples_per_class": 30, "image_size": 16, "shards": 4}
        },
        "model": {"kind": "cnn", "width": 4, "depth": 2, "dropout": 0.0},
        "train": {
            "max_epochs": 2,
            "batch_size": 32,
            "max_failures": 1,
            "early_stopping": {"metric": "val_loss", "mode": "min", "patience": 10},
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def tiny_config(storage_root: str | Path, **sections) -> ExperimentConfig:
    return config_from_dict(tiny_raw_config(storage_root, **sections))


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty local storage root."""
    root = tmp_path / "store"
    root.mkdir()
    return root
