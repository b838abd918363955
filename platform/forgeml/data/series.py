"""Time series: one series read as rows of (time, value), cut into forecast windows.

A series is read with Ray Data, then collected and ordered by time in this process: a
window needs its neighbours, and one series of even a million steps is a few megabytes.
Each window is a row: the ``window`` values before its origin (``history``) and the
``horizon`` values from it (``future``). The split is chronological, by time step: the
last ``test_fraction`` of the steps are test, the ``val_fraction`` before them
validation. A window belongs to the split that its whole horizon lies in, and windows
whose horizon crosses a boundary are not formed: every target belongs to one split, and
no training target lies past the start of validation. Histories reach back across
boundaries, since the past is known when forecasting.

Missing values stay missing in the rows. The preprocessor carries the last observed
value forward inside each history (never backward: that would look ahead) and adds a
channel that flags the filled steps; a missing future value is no target (the loss and
the metrics skip it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from forgeml.config import ExperimentConfig
from forgeml.config import SeriesFeatures as SeriesConfig
from forgeml.data.base import (
    RAW_COLUMN,
    REJECT_COLUMN,
    SPLIT_COLUMN,
    ModelInputs,
    TargetSpec,
    register_features,
    register_preprocessor,
)
from forgeml.data.columns import no_rejects, parse_numbers

ORIGIN, HISTORY, FUTURE = "origin", "history", "future"


def parse_times(values) -> tuple[np.ndarray, np.ndarray]:
    """Sortable times as float64 (numbers, or seconds since 1970 for dates, time zones
    honoured) and a mask of the values that are neither. The column is numbers if most of
    its present values are; blank values are missing."""
    series = pd.Series(np.asarray(values, dtype=object), dtype=object)
    present = series.notna() & (series.astype(str).str.strip() != "")
    series = series.where(present)
    numbers = pd.to_numeric(series, errors="coerce")
    if numbers.notna().sum() * 2 >= present.sum():
        parsed = numbers.astype(np.float64).to_numpy()
    else:
        dates = pd.to_datetime(series, errors="coerce", format="mixed", utc=True)
        parsed = (dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)
    return parsed, ~np.isfinite(parsed)


def regular_steps(times: np.ndarray, column: str) -> np.ndarray:
    """The step index of each of the sorted ``times`` on the series' regular grid: the
    median spacing is one step (months of 28 to 31 days are one step each), so a time
    step with no row leaves a hole. Spacing that is no whole number of steps is refused."""
    if len(times) < 2:
        return np.zeros(len(times), dtype=np.int64)
    spacing = np.diff(times) / np.median(np.diff(times))
    steps = np.rint(spacing)
    uneven = np.flatnonzero((np.abs(spacing - steps) > 0.25) | (steps < 1))
    if uneven.size:
        raise ValueError(
            f"column {column!r}: the times are not evenly spaced (time step {uneven[0] + 1} "
            f"comes {spacing[uneven[0]]:.2f} steps after the one before); a series needs "
            "one row per regular time step"
        )
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)


def series_rows(
    points: pd.DataFrame, cfg: SeriesConfig, val_fraction: float, test_fraction: float
) -> pd.DataFrame:
    """The forecast windows of a series, each with its split, plus a row per time step
    that cannot be placed or read (its reason in ``_reject``, its line in ``_raw``)."""
    time, value = cfg.time, cfg.value
    reasons = (
        points[REJECT_COLUMN].fillna("").to_numpy(dtype=object)
        if REJECT_COLUMN in points
        else no_rejects(len(points))
    )
    times, bad_time = parse_times(points[time])
    values, bad_value = parse_numbers(points[value])
    readable = reasons == ""
    reasons[readable & bad_time] = f"{time}: not a date or a number"
    duplicate = pd.Series(times).duplicated().to_numpy() & (reasons == "")
    reasons[duplicate] = f"{time}: a time step seen before"
    # A step whose value is text is rejected, and its place in the series stays a gap.
    reasons[(reasons == "") & bad_value] = f"{value}: not a finite number"
    placed = np.isin(reasons, ["", f"{value}: not a finite number"]) & np.isfinite(times)
    order = np.argsort(times[placed], kind="stable")
    steps = regular_steps(times[placed][order], time)
    # Time steps with no row, or whose value was rejected, are gaps: NaN in the series.
    series = np.full(steps[-1] + 1 if len(steps) else 0, np.nan)
    series[steps] = values[placed][order]
    labels = points[time].astype(str).to_numpy(dtype=object)[placed][order]
    origins = np.array([f"{labels[0]} + {i} steps" for i in range(len(series))], dtype=object)
    origins[steps] = labels
    windows = _windows(series, origins, cfg, val_fraction, test_fraction)

    rejected = reasons != ""
    raw = points[RAW_COLUMN].fillna("") if RAW_COLUMN in points else pd.Series([""] * len(points))
    gaps = pd.DataFrame(
        {
            ORIGIN: points[time].astype(str).to_numpy(dtype=object)[rejected],
            HISTORY: [np.full(cfg.window, np.nan, np.float32)] * int(rejected.sum()),
            FUTURE: [np.full(cfg.horizon, np.nan, np.float32)] * int(rejected.sum()),
            SPLIT_COLUMN: "",
            REJECT_COLUMN: reasons[rejected],
            RAW_COLUMN: raw.to_numpy(dtype=object)[rejected],
        }
    )
    return pd.concat([windows, gaps], ignore_index=True)


def _windows(
    series: np.ndarray,
    origins: np.ndarray,
    cfg: SeriesConfig,
    val_fraction: float,
    test_fraction: float,
) -> pd.DataFrame:
    steps, window, horizon = len(series), cfg.window, cfg.horizon
    test_start = steps - round(steps * test_fraction)
    val_start = test_start - round(steps * val_fraction)
    bounds = {
        "train": (window, val_start),
        "val": (val_start, test_start),
        "test": (test_start, steps),
    }
    if steps < window + horizon:
        raise ValueError(
            f"column {cfg.value!r}: the series has {steps} time steps, fewer than "
            f"data.features.window + horizon ({window} + {horizon})"
        )
    rows = []
    for split, (start, end) in bounds.items():
        origins_here = range(max(start, window), end - horizon + 1)
        if not origins_here:
            raise ValueError(
                f"column {cfg.value!r}: the {split} split (time steps {start} to {end - 1} of "
                f"{steps}) holds no window of {window} steps followed by a horizon of "
                f"{horizon}: use a longer series, a shorter window or horizon, or larger "
                "data.split fractions"
            )
        rows += [
            {
                ORIGIN: str(origins[t]),
                HISTORY: series[t - window : t].astype(np.float32),
                FUTURE: series[t : t + horizon].astype(np.float32),
                SPLIT_COLUMN: split,
                REJECT_COLUMN: "",
                RAW_COLUMN: "",
            }
            for t in origins_here
        ]
    return pd.DataFrame(rows)


def carry_forward(values: np.ndarray, fill: float) -> np.ndarray:
    """(N, T) values with each NaN replaced by the last finite value before it in its row,
    or by ``fill`` where there is none."""
    observed = np.isfinite(values)
    last = np.where(observed, np.arange(values.shape[1]), 0)
    np.maximum.accumulate(last, axis=1, out=last)
    carried = values[np.arange(len(values))[:, None], last]
    return np.where(np.isfinite(carried), carried, fill)


@dataclass(frozen=True)
class SeriesWindowFeatures:
    """Forecast windows (rows made by ``SeriesSource``, which splits them by time),
    checked before fitting."""

    cfg: SeriesConfig
    columns: list[str] = field(default_factory=lambda: [ORIGIN, HISTORY, FUTURE])
    augmentable = False

    def classes(self, batch):
        return None

    def reject_reasons(self, batch):
        """Windows with nothing observed to forecast from, or nothing observed to score."""
        reasons = no_rejects(len(batch[ORIGIN]))
        history, future = _matrix(batch[HISTORY]), _matrix(batch[FUTURE])
        reasons[~np.isfinite(history).any(1)] = f"{self.cfg.value}: no observed value in the window"
        empty = ~np.isfinite(future).any(1) & (reasons == "")
        reasons[empty] = f"{self.cfg.value}: no observed value in the horizon"
        return reasons

    def compact(self, batch, reasons):
        return batch

    def fit(self, train):
        """Mean and standard deviation of the observed values of the training windows."""
        moments = train.map_batches(_value_moments, batch_format="numpy").sum(["n", "s", "ss"])
        if not moments or not moments["sum(n)"]:
            raise ValueError("the training split is empty: add data or lower the split fractions")
        n, total, total_sq = moments["sum(n)"], moments["sum(s)"], moments["sum(ss)"]
        mean = total / n
        std = max(float(np.sqrt(max(total_sq / n - mean**2, 0.0))), 1e-6)
        return SeriesPreprocessor(
            window=self.cfg.window,
            horizon=self.cfg.horizon,
            mean=float(mean),
            std=std,
            value_column=self.cfg.value,
            season=self.cfg.seasonal_period or 0,
        )


def _matrix(column) -> np.ndarray:
    """A column of equal-length arrays as one (N, T) float64 array."""
    return (
        np.stack(column).astype(np.float64) if column.dtype == object else column.astype(np.float64)
    )


def _value_moments(batch):
    values = np.concatenate([_matrix(batch[HISTORY]), _matrix(batch[FUTURE])], axis=1)
    observed = values[np.isfinite(values)]
    return {"n": [observed.size], "s": [observed.sum()], "ss": [np.square(observed).sum()]}


@register_preprocessor
@dataclass(frozen=True)
class SeriesPreprocessor:
    """Histories as (window, 2) inputs: the value standardised with the training split's
    statistics (carried forward over gaps) and a flag that it was observed."""

    window: int
    horizon: int
    mean: float
    std: float
    value_column: str
    season: int = 0

    kind = "series-window"
    refuses_rows = False

    @property
    def model_inputs(self) -> ModelInputs:
        return ModelInputs(shape=(self.window, 2), data="series", season=self.season)

    @property
    def target(self) -> TargetSpec:
        return TargetSpec(
            name=self.value_column, mean=self.mean, std=self.std, horizon=self.horizon
        )

    def reject_reasons(self, batch):
        return no_rejects(len(batch[HISTORY]))

    def inputs(self, history: np.ndarray) -> np.ndarray:
        """(N, window) raw values, NaN where missing, to (N, window, 2) float32."""
        standardised = (carry_forward(history, self.mean) - self.mean) / self.std
        return np.stack([standardised, np.isfinite(history)], axis=-1).astype(np.float32)

    def transform(self, batch):
        out = {"inputs": self.inputs(_matrix(batch[HISTORY]))}
        if FUTURE in batch:
            out["target"] = _matrix(batch[FUTURE]).astype(np.float32)
        return out

    def request_columns(self, instances):
        """Instances ``{"history": [window numbers, null where missing]}``."""
        histories = []
        for i, instance in enumerate(instances):
            fields = instance if isinstance(instance, dict) else vars(instance)
            if set(fields) != {HISTORY}:
                raise ValueError(f"instances.{i}: expected an object with one field, 'history'")
            values = fields[HISTORY]
            if not isinstance(values, list) or len(values) != self.window:
                raise ValueError(
                    f"instances.{i}.history: expected a list of the last {self.window} values"
                )
            parsed, bad = parse_numbers(values)
            if bad.any() or any(isinstance(v, (bool, str)) for v in values):
                raise ValueError(f"instances.{i}.history: values must be numbers or null")
            if not np.isfinite(parsed).any():
                raise ValueError(f"instances.{i}.history: no observed value")
            histories.append(parsed)
        return {HISTORY: np.stack(histories)}

    def input_summary(self, inputs):
        """The last value of each history (series' units) and its share of filled steps."""
        return {
            "last_value": inputs[:, -1, 0] * self.std + self.mean,
            "missing_share": 1.0 - inputs[:, :, 1].mean(1),
        }

    def describe(self) -> dict:
        return {"kind": "series", "field": HISTORY, "window": self.window, "horizon": self.horizon}

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, state: dict) -> SeriesPreprocessor:
        return cls(**{k: v for k, v in state.items() if k != "kind"})


@register_features("series")
def series_features(cfg: ExperimentConfig) -> SeriesWindowFeatures:
    """The windows ``sources.SeriesSource`` cuts from the series' (time, value) rows."""
    return SeriesWindowFeatures(cfg.data.features)
