"""A simple baseline beside every model: what a practitioner fits first, on the same
training rows and the same preprocessed features, scored on the same test rows with the
task's own metrics, in seconds. A model that does worse than its baseline is flagged in
metrics.json, on the console, in the run report and in ``forgeml runs``.

Baselines are registered by the kind of preprocessor whose inputs they read; a task
says which of its metrics decide (``headline_metrics``). Tasks without headline metrics
(language models, generation) get none.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray.data
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from forgeml.data.base import Preprocessor
from forgeml.models.series import naive_steps

logger = logging.getLogger(__name__)

#: The most training inputs a baseline is fitted on; a larger split is sampled down.
MAX_TRAIN_BYTES = 256 << 20
#: Rows predicted at once.
BATCH_ROWS = 4096


@dataclass
class Baseline:
    """A fitted baseline: its name, and ``predict`` from model inputs to what the task's
    ``predict`` gives (class probabilities, values in the target's units)."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]


#: preprocessor kind -> fit(preprocessor, task, inputs, targets) -> Baseline.
_BASELINES: dict[str, Callable] = {}


def register_baseline(*kinds: str):
    def decorate(fit: Callable) -> Callable:
        for kind in kinds:
            _BASELINES[kind] = fit
        return fit

    return decorate


def _quietly(estimator, x, y):
    """Fit, without the convergence warnings of scikit-learn's iteration cap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(x, y)


def _probabilities(estimator, classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """predict_proba over every class index, 0 for classes the fit never saw."""

    def predict(x: np.ndarray) -> np.ndarray:
        seen = estimator.predict_proba(x)
        out = np.zeros((len(x), classes), np.float32)
        out[:, estimator.classes_.astype(int)] = seen
        return out

    return predict


def _logistic_or_ridge(preprocessor, task, x, y, features, what: str) -> Baseline:
    """Logistic regression for classes, ridge regression (its penalty chosen by
    leave-one-out on the training rows) for numbers, on ``features`` of the inputs.

    The logistic regression is scikit-learn's as it comes, capped at its default 100
    iterations: on many features (an image's pixels) it has not converged there, and
    going on costs seconds without scoring better on unseen rows (the wafer example's
    1,024 pixels: test accuracy 0.848 at 100 iterations in 2.8 s, 0.840 at 300 in
    7.3 s, 0.836 converged at 456); on fewer features it converges before the cap."""
    if preprocessor.target.classes:
        classes = len(preprocessor.target.classes)
        if len(np.unique(y)) < 2:  # logistic regression needs two classes to tell apart
            only = np.zeros(classes, np.float32)
            only[int(y[0])] = 1.0
            return Baseline(
                "the only class of the training rows", lambda x: np.tile(only, (len(x), 1))
            )
        estimator = make_pipeline(features, LogisticRegression())
        _quietly(estimator, x, y)
        return Baseline(f"logistic regression on {what}", _probabilities(estimator, classes))
    estimator = make_pipeline(features, RidgeCV(alphas=np.logspace(-3, 3, 13)))
    estimator.fit(x, y)
    return Baseline(f"ridge regression on {what}", estimator.predict)


@register_baseline("tabular")
def _table(preprocessor, task, x, y) -> Baseline:
    width = x.shape[1]
    return _logistic_or_ridge(
        preprocessor, task, x, y, FunctionTransformer(), f"the {width} encoded features"
    )


def _flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


@register_baseline("image-standardize")
def _images(preprocessor, task, x, y) -> Baseline:
    return _logistic_or_ridge(preprocessor, task, x, y, FunctionTransformer(_flatten), "the pixels")


def _token_ngrams(ids: np.ndarray) -> list[str]:
    """A row of token ids (0 pads) as its tokens and pairs of neighbouring tokens."""
    tokens = [str(t) for t in ids if t != 0]
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]


@register_baseline("text-wordpiece")
def _text(preprocessor, task, x, y) -> Baseline:
    tfidf = TfidfVectorizer(analyzer=_token_ngrams, sublinear_tf=True)
    return _logistic_or_ridge(
        preprocessor, task, x, y, tfidf, "TF-IDF of the tokens and token pairs"
    )


@register_baseline("series-window")
def _seasonal_naive(preprocessor, task, x, y) -> Baseline:
    """Each horizon step repeats the window's value one season before (or, without a
    season, its last value), carried forward over gaps as the model's inputs are."""
    steps = naive_steps(preprocessor.window, preprocessor.horizon, preprocessor.season)
    name = "the seasonal naive forecast" if preprocessor.season else "the naive forecast"

    def predict(windows: np.ndarray) -> np.ndarray:
        return windows[:, steps, 0] * preprocessor.std + preprocessor.mean

    return Baseline(name, predict)


def has_baseline(preprocessor: Preprocessor, task) -> bool:
    """Whether runs of this task on these inputs get a baseline."""
    return preprocessor.kind in _BASELINES and bool(task.headline_metrics)


def make_baseline(preprocessor: Preprocessor, task, x: np.ndarray, y: np.ndarray) -> Baseline:
    """The baseline of these inputs, fitted on training inputs ``x`` and targets ``y``."""
    return _BASELINES[preprocessor.kind](preprocessor, task, x, y)


def training_rows(dataset: ray.data.Dataset, rows: int, preprocessor: Preprocessor, seed: int):
    """Inputs and targets of the training split (``rows`` of them), a seeded sample of it
    when it holds more than ``MAX_TRAIN_BYTES`` of inputs; (None, None) when empty."""
    inputs = preprocessor.model_inputs
    row_bytes = math.prod(inputs.shape) * np.dtype(inputs.dtype).itemsize
    cap = max(MAX_TRAIN_BYTES // max(row_bytes, 1), 1)
    if rows > cap:
        dataset = dataset.random_sample(cap / rows, seed=seed)
    batches = list(dataset.iter_batches(batch_size=BATCH_ROWS, batch_format="numpy"))
    if not batches:
        return None, None
    return (
        np.concatenate([b["inputs"] for b in batches]),
        np.concatenate([b["target"] for b in batches]),
    )


def compare(model: dict, baseline: dict, headline: tuple[tuple[str, str], ...]) -> list[dict]:
    """Per headline metric: the model's and the baseline's test values, and whether the
    model does worse."""
    rows = []
    for metric, mode in headline:
        ours, theirs = model.get(metric), baseline.get(metric)
        if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs):
            continue
        worse = ours < theirs if mode == "max" else ours > theirs
        rows.append({"metric": metric, "model": ours, "baseline": theirs, "worse": worse})
    return rows


def warning_text(summary: dict) -> str | None:
    """What to tell a user whose model does worse than its baseline, or None."""
    worse = [row for row in summary["compared"] if row["worse"]]
    if not worse:
        return None
    numbers = "; ".join(
        f"{row['metric']} {row['model']:.4f} against {row['baseline']:.4f}" for row in worse
    )
    return (
        f"the model does worse on test than its baseline, {summary['model']} ({numbers}): "
        "a simpler model would serve this data better; see the baseline in the run report"
    )


def fit_baseline(
    preprocessor: Preprocessor,
    task,
    train: ray.data.Dataset,
    test: ray.data.Dataset,
    train_rows: int,
    model_test: dict,
    seed: int,
) -> dict | None:
    """The baseline's test metrics beside the model's (``model_test``) as they go into
    metrics.json; None when the task or the inputs have no baseline."""
    if not has_baseline(preprocessor, task):
        return None
    started = time.monotonic()
    x, y = training_rows(train, train_rows, preprocessor, seed)
    if x is None:
        return None
    try:
        baseline = make_baseline(preprocessor, task, x, y)
    except ValueError as exc:  # a baseline must never cost the model it stands beside
        logger.warning("no baseline for this run: %s", exc)
        return None
    metrics = task.test_metrics()
    for batch in test.iter_batches(batch_size=BATCH_ROWS, batch_format="numpy"):
        predicted = torch.as_tensor(np.asarray(baseline.predict(batch["inputs"]), np.float32))
        metrics.update(predicted, torch.as_tensor(batch["target"]))
    scores = task.report(metrics.compute())
    summary = {
        "model": baseline.name,
        "train_rows": len(x),
        "fit_s": round(time.monotonic() - started, 2),
        "test": scores,
        "compared": compare(model_test, scores, task.headline_metrics),
    }
    summary["warning"] = warning_text(summary)
    return summary
