"""The model package: the one directory that train writes and evaluate, tune and serve read.

config.yaml        the fully resolved experiment config
preprocessor.json  fitted preprocessing state
model.pt           weights plus what rebuilds the module (model config, input shape)
metrics.json       test metrics and the training history
reference.json     input and prediction statistics for drift detection
MODEL_CARD.md      what it is, data, metrics, intended use, limits
evaluation.npz     the test split's per-row outputs and targets, and example rows
report.html        the run report (learning curves, test plots, examples, explanations)
samples.png        generative models only: a grid of images they drew
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
import yaml
from pydantic import TypeAdapter

import forgeml
from forgeml.config import (
    ExperimentConfig,
    ModelConfig,
    apply_overrides,
    config_from_dict,
)
from forgeml.data.base import ModelInputs, Preprocessor, TargetSpec
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.models import build_model
from forgeml.storage import ModelRegistry, ModelVersion
from forgeml.tasks import build_task

#: Version of model.pt's layout; 2 stores the fitted TargetSpec and the ModelInputs.
MODEL_FORMAT = 2


@dataclass
class PackageContents:
    config: ExperimentConfig
    preprocessor: Preprocessor
    state_dict: dict
    metrics: dict
    reference: dict
    files: dict[str, bytes] = field(default_factory=dict)  # more, by name (samples.png)


def package_files(contents: PackageContents) -> dict[str, bytes]:
    """Serialise a package; ``ModelRegistry.register`` writes the result atomically."""
    weights = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FORMAT,
            "state_dict": contents.state_dict,
            "model": contents.config.model.model_dump(mode="json"),
            "inputs": contents.preprocessor.model_inputs.to_dict(),
            "target": contents.preprocessor.target.to_dict(),
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
        **contents.files,
    }


#: What each kind of input is, for the model card.
INPUT_DESCRIPTIONS = {
    "image": "a {height}x{width} image of {channels} channel(s) (1: grey, 3: RGB), values "
    "0 to {max_value} (for wafer maps: 0 outside the wafer, 1 good die, 2 defective die), "
    "each channel standardised with the statistics in `preprocessor.json`",
    "image-codes": "a {height}x{width} single-channel image whose values 0 to {max_value} "
    "are categories (for wafer maps: 0 outside the wafer, 1 good die, 2 defective die), "
    "read one-hot",
    "tabular": "a record of numeric features ({numeric}) and categorical features "
    "({categorical}); missing values imputed, numbers scaled and categories encoded with "
    "the state in `preprocessor.json`, fitted on the training split",
    "series": "the last {window} values of the series (`{field}`, null where missing), "
    "standardised with the training split's statistics; missing values carry the last "
    "observed one forward and are flagged",
    "text_pair": "the text in `{field}`, cut into at most {max_length} byte-level BPE "
    "tokens of a {vocab_size}-piece vocabulary trained on both sides of the training split "
    "(the tokenizer is in `preprocessor.json`)",
    "text": "the text in `{field}`, cleaned and cut into at most {max_length} WordPiece "
    "tokens of a {vocab_size}-piece vocabulary trained on the training split (the "
    "tokenizer is in `preprocessor.json`)",
}

#: Intended use and limits, by the source the model was trained on (or, for models
#: that draw images, by that).
USE_AND_LIMITS = {
    "generative": """## Intended use
Drawing new images like the training data: more examples of rare patterns for other
models to train on, test inputs for pipelines, a look at what the model has learnt.
`samples.png` shows some.

## Limits
- Drawn images are not measurements: never mix them into test data or report them as
  real.
- A judge's ratings say what one classifier sees in the images, not whether they are
  physically plausible.
- The model learnt the training data above only, including its biases.
""",
    "wafer": """## Intended use
Triage of wafer maps into failure-pattern classes, to route wafers to the right
root-cause analysis. A human reviews low-confidence predictions.

## Limits
- Trained on the data above only; maps from another fab, die size or encoding
  must be checked against `reference.json` (drift) before trusting predictions.
- Wafers with several overlapping patterns get one label.
- The built-in wafer source is synthetic, modelled on WM-811K's nine classes; its
  metrics say how well the pipeline works, not how a real fab's maps will score.
""",
    "default": """## Intended use
Predictions for rows like the training data described above.

## Limits
- Trained on the data above only: inputs from another population must be checked
  against `reference.json` (drift) before trusting predictions.
- Categories unseen in training are encoded as unknown, and missing values get the
  training split's fill values: check how often that happens in served traffic.
""",
}


def _metric_lines(test: dict) -> str:
    scalars = [
        f"{name.replace('_', ' ')} {value:.4f}"
        for name, value in test.items()
        if isinstance(value, float)
    ]
    return " ·\n".join(scalars)


def _baseline_lines(baseline: dict | None) -> str:
    """The baseline's headline test metrics beside the model's, and its warning."""
    if baseline is None:
        return ""
    scores = " ·\n".join(
        f"{row['metric'].replace('_', ' ')} {row['baseline']:.4f} (model {row['model']:.4f})"
        for row in baseline["compared"]
    )
    warning = f"\n\n**Warning:** {baseline['warning']}." if baseline["warning"] else ""
    return f"\nBaseline, {baseline['model']} on the same split:\n{scores}{warning}\n"


def _judge_line(test: dict) -> str:
    if "judge" not in test:
        return ""
    judge = test["judge"]
    return (
        f"\n\nJudged by `{judge['model']}`: the share of drawn maps (and of the real test "
        f"maps) it assigns to a class other than `{judge['no_defect_class']}` with "
        f"probability ≥ {judge['min_confidence']:g}; the class distance is the total "
        "variation between the classes it sees in drawn and in real maps."
    )


def _per_class_table(test: dict, classes: tuple[str, ...]) -> str:
    if "per_class_f1" not in test:
        return ""
    rows = "\n".join(
        f"| {name} | {test['per_class_precision'][name]:.3f} | "
        f"{test['per_class_recall'][name]:.3f} | {test['per_class_f1'][name]:.3f} |"
        for name in classes
    )
    return f"\n\n| class | precision | recall | F1 |\n|---|---|---|---|\n{rows}"


def model_card(contents: PackageContents) -> str:
    cfg, metrics = contents.config, contents.metrics
    test, target = metrics["test"], contents.preprocessor.target
    described = contents.preprocessor.describe()
    reads = ""
    if described["kind"] == "tabular":
        columns = "the encoded columns" + (
            f" {', '.join(described['selected'])}" if "selected" in described else ""
        )
        if "components" in described:
            columns = f"the first {described['components']} principal components of {columns}"
        if "selected" in described or "components" in described:
            reads = f" The model reads {columns}."
        described = {
            **described,
            "numeric": ", ".join(described["numeric"]) or "none",
            "categorical": ", ".join(described["categorical"]) or "none",
        }
    if cfg.task.draws_images:
        what = f"{described['height']}x{described['width']} images like those of `{target.name}`"
    elif target.classes:
        what = f"{len(target.classes)} classes of `{target.name}`: {', '.join(target.classes)}"
    elif target.horizon:
        what = f"the next {target.horizon} values of `{target.name}`"
    elif target.vocab_size:
        what = f"the next token of `{target.name}`, out of {target.vocab_size}"
    else:
        what = f"`{target.name}` (training mean {target.mean:.4g}, std {target.std:.4g})"
    sizes, rejected = metrics["data"]["rows"], metrics["data"]["rejected"]
    augment = (
        f"\nTraining used random quarter-turns={cfg.data.augment.rotate90} and "
        f"flips={cfg.data.augment.flip}."
        if described["kind"].startswith("image")
        else ""
    )
    use = "generative" if cfg.task.draws_images else cfg.data.source.kind
    return f"""# {cfg.name}

Trained by forgeml {forgeml.__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

## What it is
A `{cfg.model.kind}` model for `{cfg.task.kind}` of {what}.
Input: {INPUT_DESCRIPTIONS[described["kind"]].format(**described)}.{reads}

## Data
Source `{cfg.data.source.kind}`, split {metrics["data"]["split"]}:
{sizes["train"]} train, {sizes["val"]} validation, {sizes["test"]} test rows;
{sum(rejected.values())} rows rejected.{augment}

## Test metrics
{_metric_lines(test)}{_per_class_table(test, target.classes)}{_judge_line(test)}
{_baseline_lines(metrics.get("baseline"))}
{USE_AND_LIMITS.get(use, USE_AND_LIMITS["default"])}"""


@dataclass
class LoadedModel:
    version: ModelVersion
    config: ExperimentConfig
    preprocessor: Preprocessor
    model: torch.nn.Module
    task: object
    metrics: dict


def package_config(
    registry: ModelRegistry, version: ModelVersion, overrides: list[str] | None = None
) -> ExperimentConfig:
    """The experiment config a version was registered with, ``--set`` overrides applied
    (serve.* when serving, monitor.* when monitoring)."""
    raw = yaml.safe_load(registry.read(version, "config.yaml"))
    return config_from_dict(apply_overrides(raw, overrides or []), f"{version.ref}/config.yaml")


def load_model(registry: ModelRegistry, ref: str) -> LoadedModel:
    """Rebuild a registered model (eval mode, CPU) with its preprocessing and task."""
    version = registry.resolve(ref)
    config = package_config(registry, version)
    if config.task.acts:
        raise ValueError(
            f"{version.ref} is a policy (task {config.task.kind}): explanations and drift "
            "monitoring of policies are not built yet"
        )
    preprocessor = preprocessor_from_dict(json.loads(registry.read(version, "preprocessor.json")))
    try:  # tensors and plain values only: loading a package runs none of its code
        saved = torch.load(
            io.BytesIO(registry.read(version, "model.pt")), map_location="cpu", weights_only=True
        )
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ValueError(
            f"{version.ref}: model.pt holds more than weights ({first_line})"
        ) from None
    if saved.get("format") != MODEL_FORMAT:
        raise ValueError(f"{version.ref}: unsupported model.pt format {saved.get('format')}")
    task = build_task(config.task, TargetSpec.from_dict(saved["target"]))
    model_cfg = TypeAdapter(ModelConfig).validate_python(saved["model"])
    model = build_model(model_cfg, ModelInputs.from_dict(saved["inputs"]), task.num_outputs)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return LoadedModel(
        version=version,
        config=config,
        preprocessor=preprocessor,
        model=model,
        task=task,
        metrics=json.loads(registry.read(version, "metrics.json")),
    )
