"""The train/validation/test split: random with the experiment's seed, never a function of
the label, and the same however the rows are spread over files, blocks or workers.

Each row has a unit, what the seed shuffles:

* its id (``id_column``, an image's path, a wafer map's ``sample_id``) when it has one;
* otherwise its position in the source: the n-th row read from the files in order, so
  the same rows split alike from one file or many;
* with ``split.group_by``, the values of those columns: rows that share them are one
  unit and never straddle two splits.

A unit's draw is a hash of (unit, seed), uniform in [0, 1). Within each stratum (each
class when stratified, else all rows) the rows with the lowest draws are test, the next
validation, the rest training. How many: each class's share of each split rounded down
or up, so every class holds each share to within one row, as scikit-learn's stratified
split does; the rows rounding leaves over go where the totals fall short, so the totals
land on the fractions of all rows too; every class keeps a training row. Only the
cut-off draws per stratum reach the workers that tag rows.

Stratifying would part rows that share an id but not a class, so when an id holds rows
of several classes the split is not stratified (and says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from forgeml.data.base import (
    FILE_COLUMN,
    REJECT_COLUMN,
    ROW_COLUMN,
    SPLIT_COLUMN,
    STRATUM_COLUMN,
    UNIT_COLUMN,
)
from forgeml.data.columns import category


def splitmix64(values: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash (SplitMix64 finaliser), vectorised over uint64."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def draws(units: np.ndarray, seed: int) -> np.ndarray:
    """Each unit's draw in [0, 1): a pure function of (unit, seed)."""
    hashed = splitmix64(units.astype(np.uint64) ^ splitmix64(np.array([seed], np.uint64)))
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hash_values(batch: dict, columns: list[str]) -> np.ndarray:
    """A 64-bit hash per row of the named columns' values, read as text so that a value
    hashes alike however a reader spells it (3 and 3.0, None and NaN)."""
    frame = pd.DataFrame({c: [category(v) or "" for v in batch[c]] for c in columns})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)


def missing_ids(values) -> np.ndarray:
    """Which ids of an id column are missing."""
    return np.array([category(v) is None for v in values], dtype=bool)


def quotas(sizes: np.ndarray, fractions: tuple[float, ...], order: np.ndarray) -> np.ndarray:
    """Rows per stratum and split, (strata, splits), out of ``sizes``: each stratum's share
    of each split rounded down or up (so within one row of it) and summing to the
    stratum's size. The rows left after rounding down go, stratum by stratum in
    ``order``, to the split furthest below its share of all rows, so the totals land on
    the fractions too; a stratum's first row goes to the last split (training), so every
    class is trained on."""
    wanted = np.asarray(fractions)
    ideal = sizes[:, None] * wanted[None, :]
    counts = np.floor(ideal).astype(np.int64)
    room = np.ceil(ideal) > counts
    targets = sizes.sum() * wanted
    given = counts.sum(0).astype(np.float64)
    for k in order:
        for _ in range(int(sizes[k] - counts[k].sum())):
            if counts[k, -1] == 0 and room[k, -1]:
                pick = len(wanted) - 1
            else:
                pick = int(np.argmax(np.where(room[k], targets - given, -np.inf)))
            counts[k, pick] += 1
            room[k, pick] = False
            given[pick] += 1
    return counts


def _spans_strata(units: np.ndarray, strata: np.ndarray) -> bool:
    """Whether some unit (an id) holds rows of more than one stratum."""
    pairs = np.unique(np.stack([units, strata], axis=1), axis=0)
    return len(pairs) > len(np.unique(units))


def key_columns(batch: dict, features, group_by: list[str], stratify: bool) -> dict:
    """What the split draws by, per row: its unit (unless its position is its unit: no
    id column and no groups) and its stratum (a hash of its class when stratified, else
    0). Ids are hashed as text, so that 7 and 7.0 are one id however a reader types it."""
    n = len(batch[REJECT_COLUMN])
    keys = group_by or ([features.id_column] if features.id_column else [])
    units = hash_values(batch, keys) if keys else None
    classes = features.classes(batch) if stratify else None
    strata = np.zeros(n, np.uint64) if classes is None else hash_values({"c": classes}, ["c"])
    return {STRATUM_COLUMN: strata, **({} if units is None else {UNIT_COLUMN: units})}


@dataclass(frozen=True)
class SplitKeys:
    """What the plan needs of every row: its unit (or its position), its stratum, and
    whether it is usable (rejected rows take no share of a split)."""

    units: np.ndarray | None  # uint64; None: the rows' positions are their units
    files: np.ndarray
    rows: np.ndarray
    strata: np.ndarray
    usable: np.ndarray

    @staticmethod
    def of_batch(batch: dict) -> dict:
        """A batch's keys, as columns to collect (a map over the tagged rows)."""
        n = len(batch[REJECT_COLUMN])
        unplaced = np.full(n, -1, np.int64)
        return {
            "file": batch.get(FILE_COLUMN, unplaced),
            "row": batch.get(ROW_COLUMN, unplaced),
            "stratum": batch[STRATUM_COLUMN],
            "usable": batch[REJECT_COLUMN] == "",
            **({"unit": batch[UNIT_COLUMN]} if UNIT_COLUMN in batch else {}),
        }

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> SplitKeys:
        """The keys collected from every batch."""
        if frame.empty:
            frame = pd.DataFrame({c: [] for c in ("file", "row", "stratum", "usable")})
        return cls(
            units=frame["unit"].to_numpy(np.uint64) if "unit" in frame else None,
            files=frame["file"].to_numpy(np.int64),
            rows=frame["row"].to_numpy(np.int64),
            strata=frame["stratum"].to_numpy(np.uint64),
            usable=frame["usable"].to_numpy(bool),
        )


@dataclass(frozen=True)
class SplitPlan:
    """Per stratum, the draws below which a row is test, and below which validation;
    for positional units, the offset of each file's first row."""

    seed: int
    positional: bool
    offsets: np.ndarray  # int64 per file index (positional units only)
    strata: np.ndarray  # sorted uint64 stratum keys
    test_below: np.ndarray
    val_below: np.ndarray
    #: Whether the cut-offs are per class.
    stratified: bool
    #: Whether stratifying was asked for but dropped: an id holds rows of several classes.
    ids_span_classes: bool = False

    @classmethod
    def fit(cls, keys: SplitKeys, seed: int, val_fraction: float, test_fraction: float):
        """Cut-offs that give each stratum its quotas of test rows and of test and
        validation rows together (``quotas``; fewer when a group or an id sits on a
        cut-off)."""
        positional = keys.units is None
        offsets = np.zeros(0, np.int64)
        if positional:
            placed = keys.rows >= 0
            counts = np.zeros(int(keys.files.max(initial=-1)) + 1, np.int64)
            np.maximum.at(counts, keys.files[placed], keys.rows[placed] + 1)
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            units = offsets[keys.files] + keys.rows if len(counts) else keys.rows
        else:
            units = keys.units
        usable = keys.usable & (keys.rows >= 0 if positional else True)
        units, strata = units[usable], keys.strata[usable]
        stratified = bool(strata.any())
        spans = stratified and not positional and _spans_strata(units, strata)
        if spans:
            strata, stratified = np.zeros_like(strata), False
        u = draws(units, seed)
        order = np.lexsort((u, strata))
        u, strata = u[order], strata[order]
        names, starts, sizes = np.unique(strata, return_index=True, return_counts=True)
        fractions = (test_fraction, val_fraction, 1 - test_fraction - val_fraction)
        counts = quotas(sizes, fractions, np.argsort(draws(names, seed)))
        k_test, k_held = counts[:, 0], counts[:, 0] + counts[:, 1]
        test_below, val_below = np.empty(len(names)), np.empty(len(names))
        for i, (start, n) in enumerate(zip(starts, sizes, strict=True)):
            ranked = u[start : start + n]
            test_below[i] = ranked[k_test[i]] if k_test[i] < n else np.inf
            val_below[i] = ranked[k_held[i]] if k_held[i] < n else np.inf
        return cls(seed, positional, offsets, names, test_below, val_below, stratified, spans)

    def split_batch(self, batch: dict, drop: list[str]) -> dict:
        """A tagged batch with its split, without the columns in ``drop`` (the keys)."""
        batch[SPLIT_COLUMN] = self.assign(
            batch.get(UNIT_COLUMN),
            batch.get(FILE_COLUMN),
            batch.get(ROW_COLUMN),
            batch[STRATUM_COLUMN],
        )
        return {name: values for name, values in batch.items() if name not in drop}

    def assign(self, units: np.ndarray | None, files, rows, strata: np.ndarray) -> np.ndarray:
        """The split of each row; rows of a stratum the plan never saw (rejected ones)
        are training rows."""
        if self.positional:
            known = (rows >= 0) & (files < len(self.offsets))
            units = np.where(known, self.offsets[np.where(known, files, 0)] + rows, 0)
        u = draws(units, self.seed)
        if not len(self.strata):
            return np.full(len(u), "train", dtype=object)
        index = np.searchsorted(self.strata, strata).clip(max=len(self.strata) - 1)
        seen = self.strata[index] == strata
        test = seen & (u < self.test_below[index])
        val = seen & ~test & (u < self.val_below[index])
        return np.where(test, "test", np.where(val, "val", "train")).astype(object)
