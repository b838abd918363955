"""Feature selection and PCA of a table's encoded columns, fitted on the training split.

One Ray Data aggregation (``EncodedMoments``) gathers over the blocks of the encoded
training split the count, mean and scatter matrix of its columns, merged block by block
with Chan et al.'s pairwise update (no cancellation where a column's mean is large
against its spread), and for classes each class's count, mean and sum of squares.
Variances, F statistics and the PCA follow from those sums, so no process ever holds
the split. Only mutual information needs rows: scikit-learn's nearest-neighbour estimator
reads a random sample of at most ``MUTUAL_INFO_ROWS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray.data
from ray.data.aggregate import AggregateFnV2
from ray.data.block import BlockAccessor

from forgeml.config import FeatureSelection, PrincipalComponents

#: The most training rows mutual information is estimated on: its estimator holds its
#: rows in memory, and its time grows faster than their number.
MUTUAL_INFO_ROWS = 20_000


@dataclass
class Moments:
    """Count, mean and scatter (sum of outer products of deviations from the mean) of
    rows; ``scatter`` is the full matrix or, where only variances are needed, its
    diagonal."""

    rows: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, full: bool) -> Moments:
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(0) if len(values) else np.zeros(values.shape[1])
        deviations = values - mean
        scatter = deviations.T @ deviations if full else (deviations**2).sum(0)
        return cls(len(values), mean, scatter)

    def merged(self, other: Moments) -> Moments:
        if not other.rows:
            return self
        if not self.rows:
            return other
        rows = self.rows + other.rows
        delta = other.mean - self.mean
        between = np.outer(delta, delta) if self.scatter.ndim == 2 else delta**2
        return Moments(
            rows,
            self.mean + delta * (other.rows / rows),
            self.scatter + other.scatter + between * (self.rows * other.rows / rows),
        )

    @property
    def variance(self) -> np.ndarray:
        """Population variance of each column (scikit-learn's VarianceThreshold's)."""
        diagonal = np.diagonal(self.scatter) if self.scatter.ndim == 2 else self.scatter
        return diagonal / self.rows


class EncodedMoments(AggregateFnV2):
    """``Moments`` of a transformed split's ``inputs`` (the target's as a last column
    for a regression), and for a classification each class's (diagonal only)."""

    def __init__(self, classes: int):
        self.classes = classes
        super().__init__("encoded_moments", zero_factory=lambda: None, on=None, ignore_nulls=False)

    def _columns(self, batch) -> np.ndarray:
        inputs = np.asarray(batch["inputs"], dtype=np.float64)
        if self.classes:
            return inputs
        return np.concatenate([inputs, np.asarray(batch["target"], np.float64)[:, None]], 1)

    def aggregate_block(self, block):
        batch = BlockAccessor.for_block(block).to_batch_format("numpy")
        if not len(batch["inputs"]):
            return None
        columns = self._columns(batch)
        per_class = {}
        if self.classes:
            target = np.asarray(batch["target"])
            for label in np.unique(target):
                per_class[int(label)] = Moments.of(columns[target == label], full=False)
        return {"all": Moments.of(columns, full=True), "classes": per_class}

    def combine(self, current, new):
        if current is None:
            return new
        if new is None:
            return current
        classes = dict(current["classes"])
        for label, moments in new["classes"].items():
            classes[label] = classes[label].merged(moments) if label in classes else moments
        return {"all": current["all"].merged(new["all"]), "classes": classes}


def encoded_moments(encoded: ray.data.Dataset, classes: int) -> dict:
    """``EncodedMoments`` of a transformed split, as one Ray Data aggregation."""
    return encoded.aggregate(EncodedMoments(classes))["encoded_moments"]


def f_scores(moments: dict, classes: int) -> np.ndarray:
    """scikit-learn's f_classif (one-way ANOVA F) or f_regression (the F of each
    column's correlation with the target) of every column, from the moments alone."""
    every = moments["all"]
    if classes:
        by_class = moments["classes"].values()
        within = sum(m.scatter for m in by_class)
        between = sum(m.rows * (m.mean - every.mean) ** 2 for m in by_class)
        groups = len(moments["classes"])
        with np.errstate(divide="ignore", invalid="ignore"):
            return (between / (groups - 1)) / (within / (every.rows - groups))
    scatter = every.scatter
    variance = np.diagonal(scatter)
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = scatter[:-1, -1] / np.sqrt(variance[:-1] * variance[-1])
        return correlation**2 / (1 - correlation**2) * (every.rows - 2)


def mutual_information(
    encoded: ray.data.Dataset, rows: int, discrete: np.ndarray, classes: int, seed: int
) -> np.ndarray:
    """scikit-learn's mutual information of every column with the target, on at most
    ``MUTUAL_INFO_ROWS`` training rows drawn at random; ``discrete`` marks the columns
    that hold categories (one-hot, ordinal, missing indicators)."""
    if rows > MUTUAL_INFO_ROWS:
        encoded = encoded.random_sample(MUTUAL_INFO_ROWS / rows, seed=seed)
    batches = list(encoded.iter_batches(batch_size=4096, batch_format="numpy"))
    inputs = np.concatenate([batch["inputs"] for batch in batches]).astype(np.float64)
    target = np.concatenate([batch["target"] for batch in batches])
    # Imported here: scikit-learn takes a second to import, and every Ray Data and
    # training worker imports this module, while only a mutual-information fit needs it.
    from sklearn.feature_selection import mutual_info_classif, mutual_info_regression

    estimate = mutual_info_classif if classes else mutual_info_regression
    return estimate(inputs, target, discrete_features=discrete, random_state=seed)


def select_columns(
    cfg: FeatureSelection,
    names: list[str],
    variance: np.ndarray,
    scores: np.ndarray | None,
) -> dict:
    """The columns kept: those whose variance is above ``min_variance``, then the
    ``top_k`` of them by score (ties to the earlier column); in their original order."""
    candidates = np.arange(len(names))
    if cfg.min_variance is not None:
        candidates = candidates[variance > cfg.min_variance]
    if not len(candidates):
        raise ValueError(
            f"data.features.select.min_variance: no column's variance is above "
            f"{cfg.min_variance:g} (the largest: {variance.max():g})"
        )
    if cfg.top_k is not None:
        if cfg.top_k > len(candidates):
            raise ValueError(
                f"data.features.select.top_k: {cfg.top_k} asked for, but only "
                f"{len(candidates)} encoded columns are left to choose from"
            )
        ranked = np.argsort(-_finite(scores[candidates]), kind="stable")
        candidates = np.sort(candidates[ranked[: cfg.top_k]])
    kept = set(candidates.tolist())
    finite = None if scores is None else _finite(scores)
    return {
        "score": cfg.score if cfg.top_k is not None else None,
        "columns": [
            {
                "name": name,
                "variance": float(variance[i]),
                "score": None if finite is None else float(finite[i]),
                "kept": i in kept,
            }
            for i, name in enumerate(names)
        ],
    }


def kept_columns(selection: dict) -> list[int]:
    """The positions, among the encoded columns, of those a ``select_columns`` result keeps."""
    return [i for i, column in enumerate(selection["columns"]) if column["kept"]]


def _finite(scores: np.ndarray) -> np.ndarray:
    """Scores as finite numbers: an undefined one (a constant column) ranks last, a
    perfect one (a column that separates the classes alone) first."""
    largest = np.finfo(np.float64).max
    return np.nan_to_num(scores, nan=-largest, posinf=largest, neginf=-largest)


def principal_components(cfg: PrincipalComponents, moments: Moments, kept: list[int]) -> dict:
    """PCA of the ``kept`` columns from their scatter matrix: scikit-learn's
    explained variances and components (each signed so that its largest loading is
    positive, as scikit-learn signs them), and the mean they are centred on."""
    scatter = moments.scatter[np.ix_(kept, kept)]
    variances, vectors = np.linalg.eigh(scatter / (moments.rows - 1))
    order = np.argsort(variances)[::-1]
    variances, vectors = np.clip(variances[order], 0, None), vectors[:, order].T
    largest = np.abs(vectors).argmax(1)
    vectors *= np.sign(vectors[np.arange(len(vectors)), largest])[:, None]
    ratio = variances / variances.sum() if variances.sum() > 0 else np.zeros_like(variances)
    if isinstance(cfg.components, int):
        if cfg.components > len(kept):
            raise ValueError(
                f"data.features.pca.components: {cfg.components} asked for, but the PCA "
                f"reads {len(kept)} columns"
            )
        count = cfg.components
    else:
        reached = int(np.searchsorted(np.cumsum(ratio), cfg.components, side="right"))
        count = min(reached + 1, len(kept))
    return {
        "mean": moments.mean[kept].tolist(),
        "components": vectors[:count].tolist(),
        "explained_variance": variances[:count].tolist(),
        "explained_variance_ratio": ratio.tolist(),
    }


def fit_reduction(
    select: FeatureSelection | None,
    pca: PrincipalComponents | None,
    encoded: ray.data.Dataset,
    names: list[str],
    discrete: np.ndarray,
    classes: int,
    seed: int,
) -> tuple[dict | None, dict | None]:
    """The selection and the PCA of the encoded training split's columns ``names``
    (what ``TabularPreprocessor`` stores), from one pass over it (two for mutual
    information)."""
    moments = encoded_moments(encoded, classes)
    every, width = moments["all"], len(names)
    kept = list(range(width))
    selection = None
    if select is not None:
        scores = None
        if select.top_k is not None and select.score == "f_test":
            scores = f_scores(moments, classes)
        elif select.top_k is not None:
            scores = mutual_information(encoded, every.rows, discrete, classes, seed)
        selection = select_columns(select, names, every.variance[:width], scores)
        kept = kept_columns(selection)
    return selection, (principal_components(pca, every, kept) if pca is not None else None)
