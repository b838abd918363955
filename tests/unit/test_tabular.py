"""Tables without Ray: parsing, reject reasons, the fitted transform, the readers."""

import json

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from forgeml.config import (
    ClassificationTask,
    ConfigError,
    MLPConfig,
    RegressionTask,
    TabularFeatures,
    config_from_dict,
)
from forgeml.data.base import RAW_COLUMN, ModelInputs, TargetSpec
from forgeml.data.columns import parse_numbers
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.data.readers import _csv_batches, _jsonl_batches
from forgeml.data.tabular import TableFeatures, TabularPreprocessor
from forgeml.models import build_model
from forgeml.tasks import build_task

FEATURES = TabularFeatures(
    target="species", numeric=["mass", "bill"], categorical=["island"], max_categories=2
)


def _stats(**extra) -> dict:
    """Aggregation results as Ray Data returns them for a 10-row training split in which
    mass is missing twice and island once."""
    stats = {
        "rows": 10,
        "present:mass": 8,
        "mean:mass": 4000.0,
        "std:mass": 500.0,
        "min:mass": 3000.0,
        "max:mass": 5000.0,
        "median:mass": [3900.0],
        "present:bill": 10,
        "mean:bill": 40.0,
        "std:bill": 0.0,
        "min:bill": 40.0,
        "max:bill": 40.0,
        "median:bill": [40.0],
        "present:island": 9,
        "counts:island": {"values": ["Dream", "Biscoe", "Torgersen", None], "counts": [5, 3, 1, 1]},
        "target_counts": {"values": ["Gentoo", "Adelie"], "counts": [4, 6]},
    }
    return {**stats, **extra}


def test_numbers_parse_with_missing_values_and_refuse_text():
    values, bad = parse_numbers(["1.5", None, "", " 7 ", "abc", "inf", 3])
    np.testing.assert_array_equal(np.isnan(values), [False, True, True, False, True, True, False])
    assert values[0] == 1.5 and values[3] == 7 and values[6] == 3
    assert bad.tolist() == [False, False, False, False, True, True, False]


def test_rows_that_cannot_be_used_are_named_with_the_column_and_reason():
    batch = {
        "mass": np.array(["4000", "heavy", None, "3000"], dtype=object),
        "bill": np.array(["40", "41", "42", "43"], dtype=object),
        "island": np.array(["Dream", None, "Dream", "Biscoe"], dtype=object),
        "species": np.array(["Adelie", "Adelie", "Gentoo", None], dtype=object),
    }
    reasons = TableFeatures(FEATURES, "classification", None).reject_reasons(batch)
    assert reasons.tolist() == ["", "mass: not a finite number", "", "species: missing target"]

    regression = TabularFeatures(target="mass", numeric=["bill"])
    reasons = TableFeatures(regression, "regression", None).reject_reasons(batch)
    assert reasons.tolist() == ["", "mass: not a finite number", "mass: missing target", ""]

    declared = FEATURES.model_copy(update={"class_names": ["Adelie", "Chinstrap"]})
    reasons = TableFeatures(declared, "classification", None).reject_reasons(batch)
    assert reasons[2] == "species: not one of data.features.class_names"


def test_fitted_transform_imputes_scales_encodes_and_round_trips():
    pre = TabularPreprocessor.fit(TableFeatures(FEATURES, "classification", None), _stats())
    assert pre.feature_names == [
        "mass",
        "mass_missing",
        "bill",
        "island=Biscoe",
        "island=Dream",
        "island_missing",
    ]
    assert pre.target.classes == ("Adelie", "Gentoo")
    batch = {
        "mass": np.array([None, "4500"], dtype=object),
        "bill": np.array([40.0, 41.0]),
        "island": np.array(["Torgersen", None], dtype=object),
        "species": np.array(["Gentoo", "Adelie"], dtype=object),
    }
    out = pre.transform(batch)
    # median fill (3900) standardised by the training mean and std; a constant column
    # keeps scale 1; Torgersen was cut by max_categories and encodes as all zeros; a
    # missing island gets the most frequent one (Dream)
    np.testing.assert_allclose(
        out["inputs"],
        [[-0.2, 1, 0, 0, 0, 0], [1.0, 0, 1, 0, 1, 1]],
        atol=1e-6,
    )
    assert out["inputs"].dtype == np.float32 and out["target"].tolist() == [1, 0]
    restored = preprocessor_from_dict(json.loads(json.dumps(pre.to_dict())))
    assert restored == pre
    np.testing.assert_array_equal(restored.transform(batch)["inputs"], out["inputs"])


def test_ordinal_encoding_minmax_scaling_and_constant_fill():
    cfg = FEATURES.model_copy(
        update={
            "encode": "ordinal",
            "scale": "minmax",
            "impute": FEATURES.impute.model_copy(
                update={"numeric": "constant", "indicators": False}
            ),
        }
    )
    pre = TabularPreprocessor.fit(TableFeatures(cfg, "classification", None), _stats())
    out = pre.transform(
        {
            "mass": np.array([None, 5000], dtype=object),
            "bill": np.array([40, 40]),
            "island": np.array(["Dream", "Torgersen"], dtype=object),
        }
    )
    np.testing.assert_allclose(out["inputs"], [[-1.5, 0, 1], [1.0, 0, -1]])
    assert "target" not in out


def test_classes_unseen_in_training_are_refused_after_fitting():
    pre = TabularPreprocessor.fit(TableFeatures(FEATURES, "classification", None), _stats())
    reasons = pre.reject_reasons({"species": np.array(["Adelie", "Chinstrap"], dtype=object)})
    assert reasons.tolist() == ["", "species: class not in the training split"]


def test_a_single_class_or_an_empty_column_is_a_clear_error():
    features = TableFeatures(FEATURES, "classification", None)
    with pytest.raises(ValueError, match="needs at least 2"):
        TabularPreprocessor.fit(features, _stats(target_counts={"values": ["a"], "counts": [3]}))
    with pytest.raises(ValueError, match="'mass' has no values"):
        TabularPreprocessor.fit(features, _stats(**{"present:mass": 0}))


def test_request_records_become_columns_or_a_named_error():
    pre = TabularPreprocessor.fit(TableFeatures(FEATURES, "classification", None), _stats())
    columns = pre.request_columns([{"mass": 4100, "island": "Dream"}, {"bill": "39.5"}])
    assert columns["mass"].tolist() == [4100, None] and columns["bill"].tolist() == [None, "39.5"]
    assert pre.transform(columns)["inputs"].shape == (2, 6)
    with pytest.raises(ValueError, match=r"instances.1: unknown features \['wings'\]"):
        pre.request_columns([{"mass": 1}, {"wings": 2}])
    with pytest.raises(ValueError, match="instances.0.mass: expected a number, got 'heavy'"):
        pre.request_columns([{"mass": "heavy"}])
    with pytest.raises(ValueError, match="instances.0.bill: expected a number, got True"):
        pre.request_columns([{"bill": True}])


def test_csv_reader_sets_malformed_lines_aside_with_their_text(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("mass,species,extra\n4000,Adelie,x\n4100,Gentoo\n3900,Adelie,y\nNA,Gentoo,z\n")
    batches = list(_csv_batches(pafs.LocalFileSystem(), str(path), ["mass", "species"]))
    good, bad = batches
    assert good["mass"].tolist() == ["4000", "3900", None]
    assert good["species"].tolist() == ["Adelie", "Adelie", "Gentoo"]
    assert bad["_reject"].tolist() == ["csv: expected 3 fields, got 2"]
    assert bad[RAW_COLUMN][0].endswith("4100,Gentoo") and bad["mass"].tolist() == [None]


def test_csv_reader_names_a_missing_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("mass,kind\n1,a\n")
    with pytest.raises(ValueError, match="column 'species' is not in .*rows.csv"):
        list(_csv_batches(pafs.LocalFileSystem(), str(path), ["mass", "species"]))


def test_jsonl_reader_keeps_values_as_text_and_sets_bad_lines_aside(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"mass": 4000.5, "species": "Adelie"}\n'
        "\n"
        '{"mass": null}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"mass": [1], "species": "Gentoo"}\n'
    )
    good, bad = list(_jsonl_batches(pafs.LocalFileSystem(), str(path), ["mass", "species"]))
    assert good["mass"].tolist() == ["4000.5", None]
    assert good["species"].tolist() == ["Adelie", None]
    assert bad["_reject"][0].startswith("jsonl: invalid JSON")
    assert bad["_reject"][1:].tolist() == [
        "jsonl: a JSON list, not an object is not a value",
        "jsonl: list is not a value",
    ]
    assert bad[RAW_COLUMN][1].endswith(":5: [1, 2]\n")


def test_regression_learns_the_standardised_target_and_reports_real_units():
    task = build_task(RegressionTask(), TargetSpec(name="mass", mean=4000.0, std=500.0))
    outputs = torch.tensor([[0.0], [2.0]])
    targets = torch.tensor([4000.0, 5000.0])
    assert task.predict(outputs).tolist() == [4000.0, 5000.0]
    assert task.loss(outputs, targets).item() == pytest.approx(0.0)
    metrics = task.test_metrics()
    metrics.update(torch.tensor([4100.0, 4900.0, 3000.0]), torch.tensor([4000.0, 5000.0, 3500.0]))
    report = task.report(metrics.compute())
    errors = np.array([100.0, -100.0, -500.0])
    assert report["rmse"] == pytest.approx(np.sqrt(np.mean(errors**2)))
    assert report["mae"] == pytest.approx(np.mean(np.abs(errors)))
    assert report["mape"] == pytest.approx(np.mean(np.abs(errors) / [4000, 5000, 3500]))
    truth = np.array([4000.0, 5000.0, 3500.0])
    r2 = 1 - np.sum(errors**2) / np.sum((truth - truth.mean()) ** 2)
    assert report["r2"] == pytest.approx(r2, rel=1e-5)
    assert task.prediction_records(np.array([4100.0])) == [{"value": 4100.0}]


def test_mlp_maps_flat_features_to_outputs():
    model = build_model(MLPConfig(hidden=[8, 4], batch_norm=True), ModelInputs((6,), "tabular"), 3)
    assert model(torch.zeros(5, 6)).shape == (5, 3)


TABLE = {
    "source": {"kind": "table", "path": "rows.csv"},
    "features": {"kind": "tabular", "target": "y", "numeric": ["x"]},
}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": TABLE, "model": {"kind": "cnn"}}, "needs model mlp \\(got cnn\\)"),
        (
            {"data": {"source": {"kind": "table", "path": "a.csv"}}, "model": {"kind": "mlp"}},
            "a table source needs features",
        ),
        ({"data": {"features": TABLE["features"]}}, "the wafer source holds images"),
        ({"task": {"kind": "regression"}}, "task: regression needs data.features of kind tabular"),
        (
            {
                "data": TABLE,
                "model": {"kind": "mlp"},
                "task": {"kind": "regression"},
                "train": {"early_stopping": {"metric": "val_accuracy"}},
            },
            "train.early_stopping.metric: regression does not report val_accuracy",
        ),
        (
            {
                "data": {
                    **TABLE,
                    "features": {"kind": "tabular", "target": "y", "numeric": ["x", "y"]},
                },
                "model": {"kind": "mlp"},
            },
            "the target 'y' is also listed as a feature",
        ),
        (
            {
                "data": {**TABLE, "source": {"kind": "table", "path": "a", "builtin": "penguins"}},
                "model": {"kind": "mlp"},
            },
            "exactly one of path or builtin",
        ),
    ],
)
def test_parts_that_do_not_fit_together_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"name": "t", **raw})


def test_classification_config_accepts_a_table():
    cfg = config_from_dict({"name": "t", "data": TABLE, "model": {"kind": "mlp"}})
    assert isinstance(cfg.task, ClassificationTask)
