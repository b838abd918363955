"""Time series without Ray: windows and their chronological split, gaps and rejects,
carrying values forward without looking ahead, the forecasters, the masked loss and
metrics, request checks and the config rules."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from forgeml.config import (
    ConfigError,
    ForecastTask,
    RNNConfig,
    SeriesFeatures,
    TransformerConfig,
    config_from_dict,
)
from forgeml.data.base import REJECT_COLUMN, SPLIT_COLUMN
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.data.series import (
    FUTURE,
    HISTORY,
    ORIGIN,
    SeriesPreprocessor,
    carry_forward,
    series_rows,
)
from forgeml.models import build_model
from forgeml.tasks import build_task

CFG = SeriesFeatures(time="t", value="y", window=4, horizon=2)


def _points(n: int, **changes) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"t": [str(2000 + i) for i in range(n)], "y": [float(i) for i in range(n)]}
    )
    frame["y"] = frame["y"].astype(object)  # as a CSV reader hands it over: any text
    for row, value in changes.items():
        frame.loc[int(row.removeprefix("r")), "y"] = value
    return frame.sample(frac=1, random_state=0)  # the reader's order is no order


def test_windows_are_split_by_time_and_no_target_crosses_a_boundary():
    rows = series_rows(_points(40), CFG, val_fraction=0.2, test_fraction=0.2)
    assert (rows[REJECT_COLUMN] == "").all()
    # Test holds the last 8 steps (32..39), validation the 8 before (24..31).
    for split, (first, last) in {"train": (0, 23), "val": (24, 31), "test": (32, 39)}.items():
        windows = rows[rows[SPLIT_COLUMN] == split]
        targets = np.stack(windows[FUTURE])
        assert targets.min() >= first and targets.max() <= last
        origins = windows[ORIGIN].astype(int) - 2000
        np.testing.assert_array_equal(np.stack(windows[HISTORY])[:, -1], origins - 1)
    assert (rows[SPLIT_COLUMN] == "test").sum() == 8 - 2 + 1
    # A validation window reads training values: the past is known when forecasting.
    assert np.stack(rows[rows[SPLIT_COLUMN] == "val"][HISTORY]).min() < 24


def test_gaps_stay_missing_and_unreadable_steps_are_rejected_with_their_reason():
    points = _points(30, r10=np.nan, r12="n/a")
    points.loc[len(points)] = ["not a year", 1.0]
    points.loc[len(points)] = ["2003", 3.0]  # the time step 2003 again
    rows = series_rows(points, CFG, val_fraction=0.2, test_fraction=0.2)
    rejected = rows[rows[REJECT_COLUMN] != ""]
    assert sorted(rejected[REJECT_COLUMN]) == [
        "t: a time step seen before",
        "t: not a date or a number",
        "y: not a finite number",
    ]
    window = rows[rows[ORIGIN] == "2014"].iloc[0]
    history = window[HISTORY]
    assert np.isnan(history[0]) and np.isnan(history[2]) and history[3] == 13.0
    assert len(rows) - len(rejected) == 30 - 4 - 2 + 1 - 2 * (2 - 1)  # windows per split


def test_a_series_shorter_than_window_and_horizon_is_named():
    with pytest.raises(ValueError, match="column 'y': the series has 5 time steps, fewer than"):
        series_rows(_points(5), CFG, 0.2, 0.2)
    with pytest.raises(
        ValueError, match="the val split \\(time steps 10 to 10 of 12\\) holds no window"
    ):
        series_rows(_points(12), CFG.model_copy(update={"horizon": 3}), 0.1, 0.1)


def test_values_are_carried_forward_only():
    values = np.array([[np.nan, 1.0, np.nan, np.nan, 4.0, np.nan]])
    np.testing.assert_array_equal(carry_forward(values, -9.0), [[-9.0, 1, 1, 1, 4, 4]])


def _preprocessor() -> SeriesPreprocessor:
    return SeriesPreprocessor(window=4, horizon=2, mean=10.0, std=2.0, value_column="y")


def test_inputs_flag_filled_steps_and_the_json_round_trip_is_exact():
    pre = _preprocessor()
    history = np.array([[np.nan, 12.0, np.nan, 8.0]])
    inputs = pre.transform({HISTORY: history, FUTURE: np.array([[9.0, np.nan]])})["inputs"]
    np.testing.assert_array_equal(inputs[0], [[0, 0], [1, 1], [1, 0], [-1, 1]])
    restored = preprocessor_from_dict(json.loads(json.dumps(pre.to_dict())))
    assert restored == pre and pre.target.horizon == 2
    assert pre.input_summary(inputs)["missing_share"].tolist() == [0.5]


def test_requests_need_a_whole_window_of_numbers():
    pre = _preprocessor()
    columns = pre.request_columns([{"history": [1, None, 3, 4.5]}])
    assert np.isnan(columns["history"][0, 1]) and columns["history"].shape == (1, 4)
    for bad, reason in (
        ({"history": [1, 2, 3]}, "instances.0.history: expected a list of the last 4 values"),
        ({"history": [1, 2, "x", 4]}, "instances.0.history: values must be numbers or null"),
        ({"history": [None] * 4}, "instances.0.history: no observed value"),
        ({"values": [1, 2, 3, 4]}, "instances.0: expected an object with one field, 'history'"),
    ):
        with pytest.raises(ValueError, match=reason):
            pre.request_columns([bad])


FORECASTERS = [RNNConfig(cell="gru", bidirectional=False), TransformerConfig(d_model=16, heads=2)]


@pytest.mark.parametrize("autoregressive", [False, True])
@pytest.mark.parametrize("model", FORECASTERS)
@pytest.mark.parametrize(("season", "naive"), [(0, [14.0, 14.0]), (2, [13.0, 14.0])])
def test_forecasters_learn_the_correction_to_the_naive_forecast(
    model, season, naive, autoregressive
):
    """With the network's head at zero a forecaster forecasts the naive forecast, with or
    without the linear autoregression (which starts at zero)."""
    model = model.model_copy(update={"autoregressive": autoregressive})
    pre = SeriesPreprocessor(
        window=4, horizon=2, mean=10.0, std=2.0, value_column="y", season=season
    )
    task = build_task(ForecastTask(), pre.target)
    net = build_model(model, pre.model_inputs, task.num_outputs)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    history = np.array([[9.0, 11.0, 13.0, 14.0]])
    inputs = torch.from_numpy(pre.transform({HISTORY: history})["inputs"])
    forecast = task.predict(net.eval()(inputs))
    torch.testing.assert_close(forecast, torch.tensor([naive]))


@pytest.mark.parametrize("model", FORECASTERS)
def test_the_autoregression_adds_a_linear_map_of_the_filled_window(model):
    pre = SeriesPreprocessor(window=4, horizon=2, mean=10.0, std=2.0, value_column="y", season=0)
    task = build_task(ForecastTask(), pre.target)
    net = build_model(
        model.model_copy(update={"autoregressive": True}), pre.model_inputs, task.num_outputs
    )
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    linear = net.base.autoregression.linear
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]))
        linear.bias.copy_(torch.tensor([0.0, 1.0]))
    history = np.array([[9.0, 11.0, np.nan, 14.0]])  # standardised: -0.5, 0.5, 0.5 (carried), 2
    inputs = torch.from_numpy(pre.transform({HISTORY: history})["inputs"])
    forecast = task.predict(net.eval()(inputs))
    # naive 2 + (0.5 * 0.5, -0.5 + 1), back in the series' units
    torch.testing.assert_close(forecast, torch.tensor([[14.5, 15.0]]))
    assert {"base.autoregression.linear.weight", "base.autoregression.linear.bias"} <= set(
        net.state_dict()
    )


def test_a_season_must_fit_in_the_window():
    with pytest.raises(ValueError, match="seasonal_period \\(5\\) must fit in the window \\(4\\)"):
        SeriesFeatures(time="t", value="y", window=4, horizon=2, seasonal_period=5)


def test_missing_targets_count_in_neither_the_loss_nor_the_metrics():
    task = build_task(ForecastTask(), _preprocessor().target)
    outputs = torch.tensor([[0.0, 5.0], [1.0, 0.0]])  # standardised
    targets = torch.tensor([[10.0, float("nan")], [12.0, 10.0]])
    assert task.loss(outputs, targets).item() == pytest.approx(0.0)
    metrics = task.test_metrics()
    metrics.update(task.predict(outputs), targets)
    report = task.report(metrics.compute())
    assert report == {
        "rmse": pytest.approx(0.0),
        "mae": pytest.approx(0.0),
        "mape": pytest.approx(0.0),
    }
    assert task.prediction_records(np.array([[1.5, 2.5]])) == [{"forecast": [1.5, 2.5]}]


def test_forecasts_need_series_features_and_a_sequence_model():
    table = {"source": {"kind": "table", "builtin": "co2"}}
    series = {
        **table,
        "features": {"kind": "series", "time": "time", "value": "value", "window": 8, "horizon": 2},
    }
    task = {"kind": "forecast"}
    stopping = {"early_stopping": {"metric": "val_rmse"}}
    assert config_from_dict(
        {"name": "t", "data": series, "model": {"kind": "rnn"}, "task": task, "train": stopping}
    )
    with pytest.raises(ConfigError, match="of kind series, which task forecast learns from"):
        config_from_dict({"name": "t", "data": series, "model": {"kind": "rnn"}})
    with pytest.raises(
        ConfigError,
        match="model: task forecast on data.features of kind series needs model transformer or "
        "rnn \\(got mlp\\)",
    ):
        config_from_dict({"name": "t", "data": series, "model": {"kind": "mlp"}, "task": task})
    text = {
        "source": {"kind": "table", "path": "t.csv"},
        "features": {"kind": "text", "text": "tweet", "target": "label"},
    }
    with pytest.raises(ConfigError, match="model.autoregressive: .* needs data.features of kind"):
        config_from_dict(
            {"name": "t", "data": text, "model": {"kind": "rnn", "autoregressive": True}}
        )
    with pytest.raises(ConfigError, match="forecast does not report val_r2"):
        config_from_dict(
            {
                "name": "t",
                "data": series,
                "model": {"kind": "rnn"},
                "task": task,
                "train": {"early_stopping": {"metric": "val_r2"}},
            }
        )


def test_a_missing_time_step_is_a_gap_and_uneven_times_are_refused():
    points = _points(30).drop(index=10)  # no row for 2010
    rows = series_rows(points, CFG, val_fraction=0.2, test_fraction=0.2)
    window = rows[rows[ORIGIN] == "2012"].iloc[0]
    assert np.isnan(window[HISTORY][2]) and window[HISTORY][3] == 11.0  # 2008..2011
    assert (rows[ORIGIN] == "2000 + 10 steps").sum() == 1  # the hole still starts a window
    uneven = _points(30)
    uneven.loc[5, "t"] = "2004.5"
    with pytest.raises(ValueError, match="column 't': the times are not evenly spaced"):
        series_rows(uneven, CFG, 0.2, 0.2)


def test_times_in_any_zone_and_blank_times_are_read():
    zoned = pd.DataFrame(
        {
            "t": [f"2000-01-{d:02d}T00:00:00+01:00" for d in range(1, 21)],
            "y": [float(d) for d in range(20)],
        }
    )
    assert (series_rows(zoned, CFG, 0.2, 0.2)[REJECT_COLUMN] == "").all()
    blank = _points(20)
    blank.loc[3, "t"] = ""
    rows = series_rows(blank, CFG, 0.2, 0.2)
    assert rows[rows[REJECT_COLUMN] != ""][REJECT_COLUMN].tolist() == ["t: not a date or a number"]
