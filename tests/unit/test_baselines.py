"""The baselines beside every model (no Ray): what each fits on which inputs, and when a
model is flagged as worse than its baseline."""

from __future__ import annotations

import numpy as np
import pytest
from forgeml.baselines import compare, has_baseline, make_baseline, warning_text
from forgeml.config import ClassificationTask, ForecastTask, LanguageModelTask, RegressionTask
from forgeml.data.base import TargetSpec
from forgeml.data.images import ImagePreprocessor
from forgeml.data.series import SeriesPreprocessor
from forgeml.data.tabular import TabularPreprocessor
from forgeml.tasks import build_task

CLASSES = TargetSpec(classes=("a", "b", "c"), name="y")


def _table(target: TargetSpec) -> TabularPreprocessor:
    return TabularPreprocessor([], [], "onehot", "y", target)


def test_a_table_classifier_baseline_gives_every_class_a_probability():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)  # class "c" never seen in training
    task = build_task(ClassificationTask(), CLASSES)
    baseline = make_baseline(_table(CLASSES), task, x, y)
    probabilities = baseline.predict(x)
    assert probabilities.shape == (300, 3) and np.allclose(probabilities.sum(1), 1)
    assert (probabilities[:, 2] == 0).all() and (probabilities.argmax(1) == y).mean() > 0.95
    assert baseline.name == "logistic regression on the 4 encoded features"


def test_a_table_regression_baseline_is_ridge_in_the_targets_units():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (1000 + 50 * x[:, 0] - 20 * x[:, 2]).astype(np.float32)
    target = TargetSpec(name="y", mean=1000, std=50)
    baseline = make_baseline(_table(target), build_task(RegressionTask(), target), x, y)
    assert baseline.predict(x) == pytest.approx(y, abs=1.0)
    assert baseline.name.startswith("ridge regression")


def test_an_image_baseline_reads_the_pixels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 1, 6, 6)).astype(np.float32)
    x[y == 1, 0, 0, :] += 3  # class 1 has a bright top row
    target = TargetSpec(classes=("dark", "bright"), name="label")
    images = ImagePreprocessor(6, (0.0,), (1.0,), ("dark", "bright"), max_value=255)
    baseline = make_baseline(images, build_task(ClassificationTask(), target), x, y)
    assert (baseline.predict(x).argmax(1) == y).mean() > 0.95


def test_the_series_baseline_repeats_the_last_season_in_the_series_units():
    series = SeriesPreprocessor(
        window=8, horizon=3, mean=100.0, std=10.0, value_column="v", season=4
    )
    values = np.arange(8, dtype=np.float32)
    windows = np.stack([values, np.ones(8)], -1)[None].astype(np.float32)
    task = build_task(ForecastTask(), series.target)
    baseline = make_baseline(series, task, windows, np.zeros((1, 3), np.float32))
    # window positions 4, 5, 6: one season before each of the next three steps
    assert baseline.predict(windows)[0] == pytest.approx([140.0, 150.0, 160.0])
    assert baseline.name == "the seasonal naive forecast"


def test_tasks_without_headline_metrics_get_no_baseline():
    lm = build_task(LanguageModelTask(), TargetSpec(vocab_size=100, name="text"))
    assert not has_baseline(_table(CLASSES), lm)
    assert has_baseline(_table(CLASSES), build_task(ClassificationTask(), CLASSES))


def test_a_model_worse_on_any_headline_metric_is_flagged():
    headline = (("accuracy", "max"), ("auroc_ovr", "max"))
    model = {"accuracy": 0.86, "auroc_ovr": 0.65}
    rows = compare(model, {"accuracy": 0.80, "auroc_ovr": 0.83}, headline)
    assert [row["worse"] for row in rows] == [False, True]
    warning = warning_text({"model": "logistic regression", "compared": rows})
    assert "auroc_ovr 0.6500 against 0.8300" in warning and "accuracy" not in warning
    assert warning_text({"model": "x", "compared": compare(model, model, headline)}) is None
    # smaller is better for errors; a metric that is NaN is not compared
    rows = compare(
        {"rmse": 4.0, "r2": float("nan")},
        {"rmse": 3.0, "r2": 0.5},
        (("rmse", "min"), ("r2", "max")),
    )
    assert rows == [{"metric": "rmse", "model": 4.0, "baseline": 3.0, "worse": True}]


def test_training_rows_of_one_class_get_a_baseline_that_predicts_it():
    x, y = np.zeros((5, 2), np.float32), np.full(5, 1)
    baseline = make_baseline(_table(CLASSES), build_task(ClassificationTask(), CLASSES), x, y)
    assert baseline.name == "the only class of the training rows"
    assert baseline.predict(x[:2]).tolist() == [[0, 1, 0], [0, 1, 0]]
