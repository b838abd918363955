"""Train the forecasters and score the seasonal-naive and naive forecasts on the same test
windows; print one JSON object with the test RMSE, MAE and MAPE of each.

    python examples/forecasting/compare.py [--storage-root DIR] [EXAMPLE ...]

EXAMPLE is a config name in this folder (default: all of them). The baselines read the
raw test windows that forecast models are scored on, tagged by forgeml's own pipeline,
with missing values carried forward as the models' inputs are; only observed target
values are scored, as for the models.
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
from forgeml.data.pipeline import usable_rows
from forgeml.data.series import FUTURE, HISTORY, carry_forward
from forgeml.data.sources import open_source
from forgeml.models.series import naive_steps
from forgeml.storage import Storage
from forgeml.train.trainer import run_training

HERE = Path(__file__).parent


def scores(forecast: np.ndarray, truth: np.ndarray) -> dict:
    observed = np.isfinite(truth)
    error = forecast[observed] - truth[observed]
    return {
        "rmse": round(float(np.sqrt(np.mean(error**2))), 4),
        "mae": round(float(np.mean(np.abs(error))), 4),
        "mape": round(float(np.mean(np.abs(error) / np.abs(truth[observed]))), 4),
    }


def baselines(cfg) -> dict:
    """The seasonal-naive forecast repeats the last season of the window (each step's
    value one season before); the naive forecast repeats the window's last value."""
    features = cfg.data.features
    test = usable_rows(cfg, open_source(cfg, Storage(cfg.storage)))["test"]
    history = carry_forward(np.stack(test[HISTORY]).astype(np.float64), np.nan)
    truth = np.stack(test[FUTURE]).astype(np.float64)
    window, horizon, period = features.window, features.horizon, features.seasonal_period
    out = {"naive": scores(history[:, naive_steps(window, horizon, 0)], truth)}
    if period:
        out["seasonal_naive"] = scores(history[:, naive_steps(window, horizon, period)], truth)
    out["test_windows"] = len(test)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=None, help="default: the configs' root")
    parser.add_argument("examples", nargs="*", help="config names (default: all)")
    args = parser.parse_args()
    names = args.examples or sorted(path.stem for path in HERE.glob("*.yaml"))
    overrides = [f"storage.root={args.storage_root}"] if args.storage_root else []
    results = {}
    for name in names:
        cfg = load_config(HERE / f"{name}.yaml", overrides)
        started = time.monotonic()
        outcome = run_training(cfg)
        test = outcome.metrics["test"]
        model = {key: round(test[key], 4) for key in ("rmse", "mae", "mape")}
        base = baselines(cfg)
        seasonal = base.get("seasonal_naive", base["naive"])
        results[name] = {
            "model": outcome.version.ref,
            "epochs": outcome.epochs,
            "best_epoch": outcome.metrics["best_epoch"],
            "train_wall_s": round(time.monotonic() - started, 1),
            "windows": outcome.metrics["data"]["rows"],
            "rejected": outcome.metrics["data"]["rejected"],
            "forecaster": model,
            **base,
            "rmse_reduction_vs_seasonal_naive": round(1 - model["rmse"] / seasonal["rmse"], 4),
        }
    ray.shutdown()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps({"example": "forecasting", "machine": machine, **results}, indent=2))


if __name__ == "__main__":
    main()
