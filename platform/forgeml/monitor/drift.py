"""Reference statistics and drift tests.

A model package's ``reference.json`` holds, for every input summary the preprocessor
computes and every prediction value the task computes, what they looked like on the
test split: a sample of a numeric value, the counts of a categorical one. Served
traffic is recorded as the same values (``monitor.traffic``) and compared here with:

- the population stability index (PSI) over ten bins at the reference's deciles (open
  at both ends, so values outside the reference's range land in the outer bins), or over
  the categories: how large a shift is;
- the two-sample Kolmogorov-Smirnov test (numeric) or Pearson's chi-squared test against
  the reference's shares (categorical), both from scipy: whether a shift is more than
  chance. With many values tested, each uses ``p_value / values`` (Bonferroni).

A value drifts when both say so: large enough to matter and unlikely by chance. A big
window makes tiny shifts significant, a small one makes PSI noisy; asking for both keeps
the false-alarm rate low at either size.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
from scipy import stats

from forgeml.config import MonitorConfig

REFERENCE_FORMAT = 2
#: Numeric values a reference keeps per input or prediction (a random sample beyond it).
REFERENCE_SAMPLE = 5000
#: Bins of the PSI of a numeric value: the reference's deciles.
PSI_BINS = 10
#: Smallest share a PSI bin counts with, so an empty bin does not make it infinite.
PSI_FLOOR = 1e-4
#: Pseudo-count of each category in the chi-squared test's expected counts, so a
#: category the reference never saw does not divide by zero.
CATEGORY_PSEUDO_COUNT = 0.5
INPUT, PREDICTION = "input", "prediction"


def is_categorical(values: np.ndarray) -> bool:
    return values.dtype.kind in "OUSb"


def category_counts(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values.astype(str), return_counts=True)
    return dict(zip(names.tolist(), counts.tolist(), strict=True))


def summarize(values: np.ndarray, rng: np.random.Generator) -> dict:
    """One value's reference: category counts, or a sorted sample of the finite numbers."""
    if is_categorical(values):
        return {"kind": "categorical", "counts": category_counts(values)}
    finite = values[np.isfinite(values)].astype(np.float64)
    if len(finite) > REFERENCE_SAMPLE:
        finite = rng.choice(finite, REFERENCE_SAMPLE, replace=False)
    return {
        "kind": "numeric",
        "sample": [float(f"{value:.7g}") for value in np.sort(finite)],
    }


def reference_statistics(
    inputs: dict[str, np.ndarray], predictions: dict[str, np.ndarray], seed: int
) -> dict:
    """``reference.json``: the input summaries and prediction values of evaluated rows."""
    rng = np.random.default_rng(seed)
    return {
        "format": REFERENCE_FORMAT,
        "rows": int(len(next(iter(inputs.values())))),
        INPUT: {name: summarize(values, rng) for name, values in inputs.items()},
        PREDICTION: {name: summarize(values, rng) for name, values in predictions.items()},
    }


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of two count vectors over the same bins: sum of (c - r) ln(c / r) over shares."""
    r = np.maximum(reference / max(reference.sum(), 1), PSI_FLOOR)
    c = np.maximum(current / max(current.sum(), 1), PSI_FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def _shares(counts: np.ndarray) -> list[float]:
    return (counts / max(counts.sum(), 1)).round(6).tolist()


def compare_numeric(reference: dict, current: np.ndarray) -> dict:
    sample = np.asarray(reference["sample"], dtype=np.float64)
    values = current.astype(np.float64)
    values = values[np.isfinite(values)]
    quantiles = np.linspace(0, 1, PSI_BINS + 1)[1:-1]
    edges = np.unique(np.quantile(sample, quantiles))
    bins = len(edges) + 1
    reference_counts = np.bincount(np.searchsorted(edges, sample, side="right"), minlength=bins)
    current_counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins)
    test = stats.ks_2samp(sample, values)
    return {
        "kind": "numeric",
        "test": "kolmogorov-smirnov",
        "statistic": float(test.statistic),
        "p_value": float(test.pvalue),
        "psi": population_stability_index(reference_counts, current_counts),
        "reference_mean": float(sample.mean()),
        "current_mean": float(values.mean()),
        "bins": {
            "edges": edges.round(6).tolist(),
            "reference": _shares(reference_counts),
            "current": _shares(current_counts),
        },
    }


def compare_categorical(reference: dict, current: np.ndarray) -> dict:
    seen = reference["counts"]
    observed = category_counts(current)
    categories = sorted(set(seen) | set(observed))
    reference_counts = np.array([seen.get(c, 0) for c in categories], dtype=np.float64)
    current_counts = np.array([observed.get(c, 0) for c in categories], dtype=np.float64)
    expected = reference_counts + CATEGORY_PSEUDO_COUNT
    expected *= current_counts.sum() / expected.sum()
    if len(categories) > 1:
        test = stats.chisquare(current_counts, expected)
        statistic, p_value = float(test.statistic), float(test.pvalue)
    else:  # one category on both sides: nothing can have shifted
        statistic, p_value = 0.0, 1.0
    return {
        "kind": "categorical",
        "test": "chi-squared",
        "statistic": statistic,
        "p_value": p_value,
        "psi": population_stability_index(reference_counts, current_counts),
        "categories": categories,
        "reference": _shares(reference_counts),
        "current": _shares(current_counts),
    }


def drift_report(
    reference: dict, traffic: dict[str, np.ndarray], settings: MonitorConfig, model: str
) -> dict:
    """Every reference value tested against the recorded ``traffic`` (columns named
    ``input.<name>`` and ``prediction.<name>``), and the verdict."""
    rows = len(traffic.get("time", []))
    report = {
        "model": model,
        "checked_at": f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
        "rows": rows,
        "reference_rows": reference["rows"],
        "settings": {
            "window_minutes": settings.window_minutes,
            "min_rows": settings.min_rows,
            "psi_threshold": settings.psi_threshold,
            "p_value": settings.p_value,
        },
        "values": {},
        "drifted": [],
        "alarm": False,
    }
    if rows < settings.min_rows:
        report["status"] = "insufficient_traffic"
        return report
    for side in (INPUT, PREDICTION):
        for name, summary in reference[side].items():
            column = f"{side}.{name}"
            if column not in traffic:
                continue
            compare = compare_categorical if summary["kind"] == "categorical" else compare_numeric
            report["values"][column] = compare(summary, traffic[column])
    alpha = settings.p_value / max(len(report["values"]), 1)
    for column, result in report["values"].items():
        result["drifted"] = bool(
            result["psi"] >= settings.psi_threshold and result["p_value"] < alpha
        )
        if result["drifted"]:
            report["drifted"].append(column)
    report["alpha_per_value"] = alpha
    report["alarm"] = bool(report["drifted"])
    report["status"] = "drift" if report["alarm"] else "ok"
    report["max_psi"] = max((r["psi"] for r in report["values"].values()), default=0.0)
    if not math.isfinite(report["max_psi"]):
        report["max_psi"] = None
    return report
