"""Train both penguins examples and a scikit-learn gradient-boosting baseline on the same
rows; print one JSON object with the test metrics of both.

    python examples/penguins/compare.py [--storage-root DIR]

The baseline gets exactly what the MLP gets: forgeml's split (stratified by species for
the classifier, random for body mass) and its fitted preprocessing (imputation, scaling,
one-hot encoding), training rows only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import ray
from forgeml.config import load_config
from forgeml.data.pipeline import prepare_data
from forgeml.data.sources import open_source
from forgeml.storage import Storage
from forgeml.train.trainer import run_training
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_absolute_percentage_error,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)

HERE = Path(__file__).parent


def _arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    rows = dataset.take_batch(dataset.count(), batch_format="numpy")
    return rows["inputs"], rows["target"]


def baseline(cfg) -> dict:
    """Gradient boosting on forgeml's transformed splits (fit on train, scored on test)."""
    storage = Storage(cfg.storage)
    data = prepare_data(
        cfg, open_source(cfg, storage), storage.path("baseline-rejected"), storage.fs
    )
    x_train, y_train = _arrays(data.train)
    x_test, y_test = _arrays(data.test)
    if cfg.task.kind == "classification":
        model = HistGradientBoostingClassifier(random_state=cfg.seed).fit(x_train, y_train)
        probabilities = model.predict_proba(x_test)
        predicted = probabilities.argmax(1)
        return {
            "accuracy": accuracy_score(y_test, predicted),
            "macro_f1": f1_score(y_test, predicted, average="macro"),
            "auroc_ovr": roc_auc_score(y_test, probabilities, multi_class="ovr"),
        }
    model = HistGradientBoostingRegressor(random_state=cfg.seed).fit(x_train, y_train)
    predicted = model.predict(x_test)
    return {
        "rmse": root_mean_squared_error(y_test, predicted),
        "mae": mean_absolute_error(y_test, predicted),
        "mape": mean_absolute_percentage_error(y_test, predicted),
        "r2": r2_score(y_test, predicted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=None, help="default: the configs' root")
    args = parser.parse_args()
    overrides = [f"storage.root={args.storage_root}"] if args.storage_root else []
    results = {}
    for example in ("species", "body_mass"):
        cfg = load_config(HERE / f"{example}.yaml", overrides)
        started = time.monotonic()
        outcome = run_training(cfg)
        wall = time.monotonic() - started
        ours = {k: v for k, v in outcome.metrics["test"].items() if isinstance(v, float)}
        theirs = baseline(cfg)
        results[example] = {
            "model": outcome.version.ref,
            "epochs": outcome.epochs,
            "train_wall_s": round(wall, 1),
            "test_rows": outcome.metrics["data"]["rows"]["test"],
            "rejected": outcome.metrics["data"]["rejected"],
            "forgeml_mlp": {k: round(ours[k], 4) for k in theirs},
            "sklearn_gradient_boosting": {k: round(float(v), 4) for k, v in theirs.items()},
        }
    ray.shutdown()
    print(
        json.dumps(
            {
                "example": "penguins",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                **results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
