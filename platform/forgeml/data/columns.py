"""Column helpers every data kind shares: reasons a row is refused, and values parsed
as numbers or categories the same way everywhere."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def no_rejects(n: int) -> np.ndarray:
    return np.full(n, "", dtype=object)


def first_reason(*reasons: np.ndarray) -> np.ndarray:
    """Per row, the first non-empty reason of several reason arrays. A missing reason
    (None) is no reason: a block that holds a reader's rejected rows beside rows read
    well has None for those."""
    out = no_rejects(len(reasons[0]))
    for reason in reasons:
        reason = np.asarray(reason, dtype=object)
        given = (out == "") & pd.notna(reason) & (reason != "")
        out[given] = reason[given]
    return out


def category(value) -> str | None:
    """A value as the text of a category: None when missing; 3.0 and 3 are both '3'
    (NumPy's floats of any width too)."""
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            value = int(value)
    text = str(value).strip()
    return text or None


def parse_numbers(values) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN where missing) and a mask of values that are present but not a
    finite number. Empty strings and nulls are missing."""
    series = pd.Series(np.asarray(values, dtype=object), dtype=object)
    missing = series.isna() | (series.astype(str).str.strip() == "")
    parsed = pd.to_numeric(series.where(~missing), errors="coerce").astype(np.float64)
    numbers = parsed.to_numpy(copy=True)
    bad = ~missing.to_numpy() & ~np.isfinite(numbers)
    numbers[bad] = np.nan
    return numbers, bad


def parse_categories(values) -> np.ndarray:
    return np.array([category(v) for v in values], dtype=object)


def mark_class_rejects(reasons: np.ndarray, values, target: str, declared: list[str] | None):
    """Set the reason of rows whose class is missing or not among the declared classes."""
    labels = parse_categories(values)
    reasons[np.equal(labels, None) & (reasons == "")] = f"{target}: missing target"
    if declared:
        unknown = ~np.isin(labels.astype(str), declared) & (labels != None)  # noqa: E711
        reasons[unknown & (reasons == "")] = f"{target}: not one of data.features.class_names"


def unseen_class_reasons(values, target: str, classes: tuple[str, ...]) -> np.ndarray:
    """Reasons for rows whose class the fitted classes lack ("" for the others)."""
    labels = parse_categories(values)
    reasons = no_rejects(len(labels))
    unseen = ~np.isin(labels.astype(str), classes) & (labels != None)  # noqa: E711
    reasons[unseen] = f"{target}: class not in the training split"
    return reasons
