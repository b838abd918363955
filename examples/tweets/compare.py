"""Train the Transformer and the BiLSTM on the tweets, and a TF-IDF + logistic-regression
baseline on the same rows; print one JSON object with the test metrics of all three,
and how sure each network's lead over the baseline is.

    python examples/tweets/compare.py [--storage-root DIR]

The baseline sees the raw texts of exactly the rows the networks train and test on:
the same split and the same rejected rows, tagged by forgeml's own pipeline. The
lead is a paired bootstrap over the test tweets: both predictions of a resampled tweet
are kept together, so the interval reflects the test set's size, not training noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from forgeml.config import load_config
from forgeml.data.pipeline import usable_rows
from forgeml.data.sources import open_source
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.trainer import run_training
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from sklearn.pipeline import make_pipeline

HERE = Path(__file__).parent
#: The configs compared, each a YAML file in this folder.
EXAMPLES = ("bag_of_ngrams", "transformer", "bilstm")


def baseline(cfg, train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """TF-IDF over word uni- and bigrams, multinomial logistic regression, fit on train;
    its predicted class of each test row."""
    text, target = cfg.data.features.text, cfg.data.features.target
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000),
    ).fit(train[text], train[target])
    return model.predict(test[text])


def network_predictions(cfg, ref: str, test: pd.DataFrame) -> np.ndarray:
    """The registered model's predicted class of each test row, as forgeml evaluates it."""
    loaded = load_model(ModelRegistry(Storage(cfg.storage)), ref)
    inputs = loaded.preprocessor.transform({cfg.data.features.text: test[cfg.data.features.text]})
    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(inputs["inputs"]))
    return np.asarray(loaded.task.class_names)[logits.argmax(1).numpy()]


def lead(truth, network, reference, draws: int = 2000, seed: int = 0) -> dict:
    """Macro-F1 of ``network`` minus that of ``reference`` on the test rows, and its 95%
    paired-bootstrap interval."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(draws):
        rows = rng.integers(0, len(truth), len(truth))
        differences.append(
            f1_score(truth[rows], network[rows], average="macro")
            - f1_score(truth[rows], reference[rows], average="macro")
        )
    low, high = np.percentile(differences, [2.5, 97.5])
    point = f1_score(truth, network, average="macro") - f1_score(truth, reference, average="macro")
    return {"macro_f1": round(float(point), 4), "ci95": [round(low, 4), round(high, 4)]}


def scores(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    precision, recall, _, _ = precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0
    )
    return {
        "accuracy": round(accuracy_score(truth, predicted), 4),
        "macro_f1": round(f1_score(truth, predicted, average="macro"), 4),
        "per_class_precision": dict(zip(classes, precision.round(4).tolist(), strict=True)),
        "per_class_recall": dict(zip(classes, recall.round(4).tolist(), strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=None, help="default: the configs' root")
    args = parser.parse_args()
    overrides = [f"storage.root={args.storage_root}"] if args.storage_root else []
    results = {}
    for example in EXAMPLES:
        cfg = load_config(HERE / f"{example}.yaml", overrides)
        started = time.monotonic()
        outcome = run_training(cfg)
        test = outcome.metrics["test"]
        results[example] = {
            "model": outcome.version.ref,
            "epochs": outcome.epochs,
            "best_epoch": outcome.metrics["best_epoch"],
            "train_wall_s": round(time.monotonic() - started, 1),
            "rows": outcome.metrics["data"]["rows"],
            "rejected": outcome.metrics["data"]["rejected"],
            "accuracy": round(test["accuracy"], 4),
            "macro_f1": round(test["macro_f1"], 4),
            "auroc_ovr": round(test["auroc_ovr"], 4),
            "per_class_precision": {k: round(v, 4) for k, v in test["per_class_precision"].items()},
            "per_class_recall": {k: round(v, 4) for k, v in test["per_class_recall"].items()},
        }
    source = open_source(cfg, Storage(cfg.storage))
    splits = usable_rows(cfg, source)
    train, test = splits["train"], splits["test"]
    truth = test[cfg.data.features.target].to_numpy()
    reference = baseline(cfg, train, test)
    results["tfidf_logistic_regression"] = scores(truth, reference, sorted(set(truth)))
    results["lead_over_tfidf"] = {
        example: lead(truth, network_predictions(cfg, results[example]["model"], test), reference)
        for example in EXAMPLES
    }
    ray.shutdown()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps({"example": "tweets", "machine": machine, **results}, indent=2))


if __name__ == "__main__":
    main()
