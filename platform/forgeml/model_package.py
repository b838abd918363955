"""The model package: the one directory that train writes and evaluate, tune and serve read.

config.yaml        the fully resolved experiment config
preprocessor.json  fitted preprocessing state
model.pt           weights plus what rebuilds the module (model config, input shape)
metrics.json       test metrics and the training history
reference.json     input and prediction statistics for drift detection
MODEL_CARD.md      what it is, data, metrics, intended use, limits
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
import yaml
from pydantic import TypeAdapter

import forgeml
from forgeml.config import ExperimentConfig, ModelConfig, config_from_dict
from forgeml.data.preprocessing import WaferPreprocessor
from forgeml.models import build_model
from forgeml.storage import ModelRegistry, ModelVersion
from forgeml.tasks import build_task

MODEL_FORMAT = 1


@dataclass
class PackageContents:
    config: ExperimentConfig
    preprocessor: WaferPreprocessor
    state_dict: dict
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    metrics: dict
    reference: dict


def package_files(contents: PackageContents) -> dict[str, bytes]:
    """Serialise a package; ``ModelRegistry.register`` writes the result atomically."""
    weights = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FORMAT,
            "state_dict": contents.state_dict,
            "model": contents.config.model.model_dump(mode="json"),
            "input_shape": list(contents.input_shape),
            "class_names": list(contents.class_names),
        },
        weights,
    )
    return {
        "config.yaml": contents.config.to_yaml().encode(),
        "preprocessor.json": json.dumps(contents.preprocessor.to_dict(), indent=2).encode(),
        "model.pt": weights.getvalue(),
        "metrics.json": json.dumps(contents.metrics, indent=2).encode(),
        "reference.json": json.dumps(contents.reference, indent=2).encode(),
        "MODEL_CARD.md": model_card(contents).encode(),
    }


def model_card(contents: PackageContents) -> str:
    cfg, test = contents.config, contents.metrics["test"]
    per_class = "\n".join(
        f"| {name} | {test['per_class_precision'][name]:.3f} | "
        f"{test['per_class_recall'][name]:.3f} | {test['per_class_f1'][name]:.3f} |"
        for name in contents.class_names
    )
    sizes = contents.metrics["data"]["rows"]
    return f"""# {cfg.name}

Trained by forgeml {forgeml.__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

## What it is
A `{cfg.model.kind}` model for `{cfg.task.kind}` of {len(contents.class_names)} classes:
{", ".join(contents.class_names)}. Input: a {contents.input_shape[1]}x{contents.input_shape[2]}
wafer map (0 outside the wafer, 1 good die, 2 defective die), standardised with the
statistics in `preprocessor.json`.

## Data
Source `{cfg.data.source.kind}`, split deterministically by row id with seed {cfg.seed}:
{sizes["train"]} train, {sizes["val"]} validation, {sizes["test"]} test rows.
Training used random quarter-turns={cfg.data.augment.rotate90} and flips={cfg.data.augment.flip}.

## Test metrics
accuracy {test["accuracy"]:.4f} · macro precision {test["macro_precision"]:.4f} ·
macro recall {test["macro_recall"]:.4f} · macro F1 {test["macro_f1"]:.4f} ·
one-vs-rest AUC-ROC {test["auroc_ovr"]:.4f}

| class | precision | recall | F1 |
|---|---|---|---|
{per_class}

## Intended use
Triage of wafer maps into failure-pattern classes, to route wafers to the right
root-cause analysis. A human reviews low-confidence predictions.

## Limits
- Trained on the data above only; maps from another fab, die size or encoding
  must be checked against `reference.json` (drift) before trusting predictions.
- Wafers with several overlapping patterns get one label.
- The built-in wafer source is synthetic, modelled on WM-811K's nine classes; its
  metrics say how well the pipeline works, not how a real fab's maps will score.
"""


@dataclass
class LoadedModel:
    version: ModelVersion
    config: ExperimentConfig
    preprocessor: WaferPreprocessor
    model: torch.nn.Module
    task: object
    class_names: tuple[str, ...]
    metrics: dict


def load_model(registry: ModelRegistry, ref: str) -> LoadedModel:
    """Rebuild a registered model (eval mode, CPU) with its preprocessing and task."""
    version = registry.resolve(ref)
    config = config_from_dict(yaml.safe_load(registry.read(version, "config.yaml")), ref)
    preprocessor = WaferPreprocessor.from_dict(
        json.loads(registry.read(version, "preprocessor.json"))
    )
    saved = torch.load(io.BytesIO(registry.read(version, "model.pt")), map_location="cpu")
    if saved.get("format") != MODEL_FORMAT:
        raise ValueError(f"{version.ref}: unsupported model.pt format {saved.get('format')}")
    class_names = tuple(saved["class_names"])
    task = build_task(config.task, class_names)
    model_cfg = TypeAdapter(ModelConfig).validate_python(saved["model"])
    model = build_model(model_cfg, tuple(saved["input_shape"]), task.num_outputs)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return LoadedModel(
        version=version,
        config=config,
        preprocessor=preprocessor,
        model=model,
        task=task,
        class_names=class_names,
        metrics=json.loads(registry.read(version, "metrics.json")),
    )
