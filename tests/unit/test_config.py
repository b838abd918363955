import json
import re
import subprocess
import sys

import pytest
from forgeml.cli import main
from forgeml.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    reference_markdown,
)

from tests.conftest import REPO, tiny_raw_config, write_config

EXAMPLE = REPO / "examples" / "wafer" / "config.yaml"


def test_example_config_loads_with_overrides():
    cfg = load_config(EXAMPLE, ["train.max_epochs=3", "train.optimizer.lr=1e-4", "seed=5"])
    assert cfg.train.max_epochs == 3
    assert cfg.train.optimizer.lr == pytest.approx(1e-4)
    assert cfg.seed == 5
    assert cfg.model.kind == "cnn"


def test_override_creates_nested_sections_and_parses_yaml_values():
    raw = apply_overrides({}, ["train.schedule.kind=step", "data.augment.flip=false"])
    assert raw == {"train": {"schedule": {"kind": "step"}}, "data": {"augment": {"flip": False}}}


@pytest.mark.parametrize(
    ("override", "path", "reason"),
    [
        ("train.max_epochs=0", "train.max_epochs", "greater than or equal to 1"),
        ("train.optimizer.lr=-0.1", "train.optimizer.lr", "greater than 0"),
        ("model.colour=red", "model.colour", "Extra inputs are not permitted"),
        ("scaling.num_workers=two", "scaling.num_workers", "valid integer"),
        ("train.schedule.kind=linear", "train.schedule", "does not match any of the expected tags"),
        ("train.early_stopping.metric=val_auc", "train.early_stopping.metric", "val_loss"),
    ],
)
def test_bad_fields_are_named_with_the_reason(tmp_path, override, path, reason):
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(config, [override])
    line = next(line for line in str(info.value).splitlines() if line.strip().startswith(path))
    assert reason in line


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("scaling.num_workers=[2,1]", "[min, max] with min <= max, got [2, 1]"),
        ("scaling.num_workers=[0,2]", "at least 1 worker"),
        ("scaling.placement_strategy=STRICT_SPREAD", "STRICT_SPREAD cannot be combined"),
        ("scaling.label_selector={zone: a}", "label_selector cannot be combined"),
    ],
)
def test_an_elastic_worker_range_is_checked(tmp_path, override, reason):
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(tmp_path))
    elastic = load_config(config, ["scaling.num_workers=[1, 4]"]).scaling
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers) == (True, 1, 4)
    assert load_config(config, ["scaling.num_workers=[2,2]"]).scaling.num_workers == 2
    with pytest.raises(ConfigError, match=re.escape(reason)):
        load_config(config, ["scaling.num_workers=[1, 4]", override])


def test_split_fractions_must_leave_training_rows(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(tmp_path))
    with pytest.raises(ConfigError, match="val_fraction \\+ split.test_fraction must be < 0.8"):
        load_config(config, ["data.split.val_fraction=0.45", "data.split.test_fraction=0.45"])


def test_override_into_a_value_is_rejected(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(tmp_path))
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(config, ["seed.x=1"])
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(config, ["train.max_epochs"])


def test_schema_is_valid_json_schema_with_descriptions(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(ExperimentConfig.model_fields)
    lr = schema["$defs"]["OptimizerConfig"]["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0 and lr["description"]


def test_configuration_reference_is_generated_from_the_schema():
    documented = (REPO / "docs" / "configuration.md").read_text()
    assert documented == reference_markdown(), "run: forgeml config docs > docs/configuration.md"
    for section in ("storage", "data.source", "train.schedule", "train.early_stopping", "scaling"):
        assert f"## `{section}`" in documented


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*/*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    assert load_config(path).name


TABLE = {"kind": "table", "path": "rows.csv"}
TABULAR = {"kind": "tabular", "target": "y", "numeric": ["x"]}
SERIES = {"kind": "series", "time": "t", "value": "v", "window": 4, "horizon": 1}


@pytest.mark.parametrize(
    ("data", "task", "message"),
    [
        ({"split": {"group_by": ["y"]}}, "classification", "'y' is the target"),
        ({"split": {"group_by": ["x"], "stratify": True}}, "classification", "cannot be combined"),
        ({"split": {"stratify": True}}, "regression", "task regression has none"),
        ({"split": {"group_by": ["x", "x"]}}, "classification", "names a column twice"),
        (
            {
                "source": {"kind": "image_folder", "path": "images"},
                "features": None,
                "split": {"group_by": ["x"]},
            },
            "classification",
            "has no columns to group by",
        ),
        (
            {
                "source": {
                    "kind": "parquet",
                    "path": "maps",
                    "image_size": 8,
                    "class_names": ["a", "b"],
                },
                "features": None,
                "split": {"group_by": ["label"]},
            },
            "classification",
            "'label' is the target",
        ),
        (
            {
                "features": {
                    "kind": "series",
                    "time": "t",
                    "value": "v",
                    "window": 4,
                    "horizon": 1,
                },
                "split": {"group_by": ["t"]},
            },
            "forecast",
            "a series is split by time",
        ),
    ],
)
def test_splits_that_would_follow_the_label_or_cannot_be_made_are_refused(data, task, message):
    raw = {"name": "t", "data": {"source": TABLE, "features": TABULAR, **data}}
    raw["task"] = {"kind": task}
    if raw["data"]["features"] is None:
        del raw["data"]["features"]
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_the_config_package_imports_without_ray_or_torch():
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, forgeml.config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"
