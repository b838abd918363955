"""The Ray Data pipeline: read -> tag rows (split, reject reason) -> fit on train ->
write rejects aside -> transform every split -> augment train.

Everything is lazy Ray Data until ``prepare_data`` fits the preprocessor (one pass over
the usable training rows) and counts the rows. With ``data.cache`` the tagged raw rows
and the transformed splits are materialised, so epochs read from the object store;
without it every pass streams from storage, which is what data larger than the object
store needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data import RandomSeedConfig, SaveMode

from forgeml.config import AugmentConfig, ExperimentConfig
from forgeml.data.preprocessing import (
    REJECT_COLUMN,
    SPLIT_COLUMN,
    SPLITS,
    Features,
    Preprocessor,
    TargetSpec,
    assign_split,
    augment,
    first_reason,
    no_rejects,
)
from forgeml.data.sources import DataSource

logger = logging.getLogger(__name__)


class TooManyRejects(ValueError):
    """More rows than ``data.max_reject_fraction`` allows could not be used."""


@dataclass
class PreparedData:
    """Transformed splits (not augmented) and the state fitted on the training split."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    preprocessor: Preprocessor
    sizes: dict[str, int]
    rejected: dict[str, int]
    augment: AugmentConfig | None
    cached: bool
    seed: int

    @property
    def target(self) -> TargetSpec:
        return self.preprocessor.target

    def as_trainer_datasets(self) -> dict[str, ray.data.Dataset]:
        """What training streams: train in a new block order every epoch (augmented
        images), val as is. Reordering blocks needs them all at hand, so it only runs on
        cached splits; streamed ones are read in a new file order every epoch instead.

        The block orders follow from the experiment's seed and the epoch, so a rerun of a
        config (a tuned trial's, say) sees its rows in the same order."""
        train = (
            self.train.randomize_block_order(seed=RandomSeedConfig(seed=self.seed))
            if self.cached
            else self.train
        )
        if self.augment and (self.augment.rotate90 or self.augment.flip):
            train = train.map_batches(
                _augment,
                fn_kwargs={"rotate90": self.augment.rotate90, "flip": self.augment.flip},
                batch_format="numpy",
            )
        return {"train": train, "val": self.val}


def _augment(batch, rotate90: bool, flip: bool):
    """The images of a batch: its inputs, and its target when that is the image too."""
    names = ["inputs", *(["target"] if batch["target"].ndim >= 3 else [])]
    # Unseeded on purpose: every epoch and every block must see fresh transforms.
    turned = augment([batch[name] for name in names], rotate90, flip, np.random.default_rng())
    batch.update(zip(names, turned, strict=True))
    return batch


def _tag(batch, features: Features, seed: int, val: float, test: float):
    """Each raw row's split and, if it cannot be used, why (reader rejects come first).
    The split is a hash of the row id, unless the source set it (time series)."""
    reasons = features.reject_reasons(batch)
    if REJECT_COLUMN in batch:
        reasons = first_reason(np.asarray(batch[REJECT_COLUMN], dtype=object), reasons)
    if SPLIT_COLUMN not in batch:
        batch[SPLIT_COLUMN] = assign_split(features.row_ids(batch), seed, val, test)
    batch[REJECT_COLUMN] = reasons
    return features.compact(batch, reasons)


def _check_fitted(batch, preprocessor: Preprocessor):
    """Reasons only the fitted state knows, such as a class the training split lacks."""
    usable = batch[REJECT_COLUMN] == ""
    later = no_rejects(len(usable))
    if usable.any():
        later[usable] = preprocessor.reject_reasons({k: v[usable] for k, v in batch.items()})
    batch[REJECT_COLUMN] = first_reason(batch[REJECT_COLUMN], later)
    return batch


def _rows(batch, split: str | None, rejected: bool = False):
    """Rows of one split that are usable, or (``rejected``) the rejected rows of any split."""
    keep = batch[REJECT_COLUMN] != "" if rejected else batch[REJECT_COLUMN] == ""
    if split is not None:
        keep &= batch[SPLIT_COLUMN] == split
    return {name: values[keep] for name, values in batch.items()}


def _tally(batch):
    """Rows per (split, reject reason) in one batch."""
    frame = pd.DataFrame({"split": batch[SPLIT_COLUMN], "reason": batch[REJECT_COLUMN]})
    counts = frame.groupby(["split", "reason"]).size().reset_index(name="rows")
    return {name: counts[name].to_numpy() for name in counts.columns}


def _transform(batch, preprocessor: Preprocessor):
    return preprocessor.transform(batch)


def write_rejects(rows: ray.data.Dataset, folder: str, filesystem: pafs.FileSystem) -> None:
    """Rejected rows as Parquet, each with its ``_reject`` reason (and ``_raw`` line)."""
    rejected = rows.map_batches(
        _rows, fn_kwargs={"split": None, "rejected": True}, batch_format="numpy"
    )
    rejected.write_parquet(folder, filesystem=filesystem, mode=SaveMode.OVERWRITE)


@dataclass
class RowCounts:
    total: int
    usable: dict[str, int]
    rejected: dict[str, int]  # reason -> rows, most frequent first

    @classmethod
    def of(cls, rows: ray.data.Dataset) -> RowCounts:
        tally = rows.map_batches(_tally, batch_format="numpy").to_pandas()
        if tally.empty:
            return cls(0, dict.fromkeys(SPLITS, 0), {})
        usable = tally[tally["reason"] == ""].groupby("split")["rows"].sum()
        reasons = tally[tally["reason"] != ""].groupby("reason")["rows"].sum()
        return cls(
            total=int(tally["rows"].sum()),
            usable={name: int(usable.get(name, 0)) for name in SPLITS},
            rejected={str(r): int(n) for r, n in reasons.sort_values(ascending=False).items()},
        )


def _account_for_rejects(
    cfg: ExperimentConfig,
    rows: ray.data.Dataset,
    folder: str,
    filesystem: pafs.FileSystem,
    written: int = 0,
) -> RowCounts:
    """Count rows; write the rejected ones aside (unless the ``written`` rejects already
    are all of them); fail on too many or on an empty split."""
    counts = RowCounts.of(rows)
    if counts.total == 0:
        raise ValueError("data.source holds no rows")
    n = sum(counts.rejected.values())
    if n > written:
        write_rejects(rows, folder, filesystem)
    if n:
        reasons = "; ".join(f"{r} ({c})" for r, c in list(counts.rejected.items())[:5])
        message = f"{n} of {counts.total} rows rejected ({n / counts.total:.1%}): {reasons}"
        if n > cfg.data.max_reject_fraction * counts.total:
            raise TooManyRejects(
                f"{message}. That is more than data.max_reject_fraction "
                f"({cfg.data.max_reject_fraction:g}); the rows and reasons are in {folder}"
            )
        if n > written:
            logger.warning("%s; the rows and reasons are in %s", message, folder)
    for name, size in counts.usable.items():
        if size == 0:
            raise ValueError(
                f"the {name} split is empty ({counts.total} rows, {n} rejected): "
                "add data or change data.split"
            )
    return counts


def tag_rows(cfg: ExperimentConfig, source: DataSource) -> ray.data.Dataset:
    """The raw rows with their split and reject reason (before anything is fitted)."""
    split = cfg.data.split
    return source.read(shuffle_files=not cfg.data.cache).map_batches(
        _tag,
        fn_kwargs={
            "features": source.features,
            "seed": cfg.seed,
            "val": split.val_fraction,
            "test": split.test_fraction,
        },
        batch_format="numpy",
    )


def _in_order(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """``dataset``, set to keep its blocks in the order of its input: cached splits whose
    blocks are listed as they finish would reach training in another order every run."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def usable_rows(cfg: ExperimentConfig, source: DataSource, split: str) -> pd.DataFrame:
    """The raw rows of one split that the features accept, collected to this process: for
    baselines that must see exactly the rows a model trains or is tested on (small data)."""
    rows = tag_rows(cfg, source).map_batches(
        _rows, fn_kwargs={"split": split}, batch_format="numpy"
    )
    return rows.to_pandas().drop(columns=[SPLIT_COLUMN, REJECT_COLUMN])


def prepare_data(
    cfg: ExperimentConfig,
    source: DataSource,
    rejects_folder: str,
    filesystem: pafs.FileSystem,
) -> PreparedData:
    """Transformed train/val/test datasets of an opened source, and the fitted state.

    Rejected rows go to ``rejects_folder`` on ``filesystem``, with their reasons, before
    anything fails; more than ``data.max_reject_fraction`` of them raises TooManyRejects.
    Rows are counted before fitting (so a split left empty by rejects is named) and again
    after, when the fitted state can refuse more (a class the training split lacks).
    """
    tagged = tag_rows(cfg, source)
    if cfg.data.cache:
        tagged = _in_order(tagged).materialize()
    before = _account_for_rejects(cfg, tagged, rejects_folder, filesystem)
    preprocessor = source.features.fit(
        tagged.map_batches(_rows, fn_kwargs={"split": "train"}, batch_format="numpy")
    )
    checked, counts = tagged, before
    if preprocessor.refuses_rows:
        checked = tagged.map_batches(
            _check_fitted, fn_kwargs={"preprocessor": preprocessor}, batch_format="numpy"
        )
        counts = _account_for_rejects(
            cfg, checked, rejects_folder, filesystem, written=sum(before.rejected.values())
        )

    splits = {}
    for name in SPLITS:
        rows = checked.map_batches(_rows, fn_kwargs={"split": name}, batch_format="numpy")
        transformed = rows.map_batches(
            _transform, fn_kwargs={"preprocessor": preprocessor}, batch_format="numpy"
        )
        splits[name] = _in_order(transformed).materialize() if cfg.data.cache else transformed

    logger.info("data: %s", ", ".join(f"{k} {v} rows" for k, v in counts.usable.items()))
    return PreparedData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        preprocessor=preprocessor,
        sizes=counts.usable,
        rejected=counts.rejected,
        augment=cfg.data.augment if source.features.augmentable else None,
        cached=cfg.data.cache,
        seed=cfg.seed,
    )
