"""The Ray Data pipeline: read -> tag rows (split, reject reason) -> fit on train ->
write rejects aside -> transform every split (training workers augment their own batches).

Everything is lazy Ray Data until ``prepare_data`` fits the preprocessor (one pass over
the usable training rows) and counts the rows. With ``data.cache`` the tagged raw rows
and the transformed splits are materialised, so epochs read from the object store;
without it every pass streams from storage, which is what data larger than the object
store needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
from ray.data import SaveMode

from forgeml.config import AugmentConfig, ExperimentConfig
from forgeml.console import Steps
from forgeml.data.base import (
    FILE_COLUMN,
    REJECT_COLUMN,
    ROW_COLUMN,
    SPLIT_COLUMN,
    SPLITS,
    STRATUM_COLUMN,
    UNIT_COLUMN,
    Features,
    Preprocessor,
    TargetSpec,
)
from forgeml.data.columns import first_reason, no_rejects
from forgeml.data.readers import DataSource
from forgeml.data.shards import ShardPerWorker, cut_for_training, deal, in_epoch_order
from forgeml.data.split import SplitKeys, SplitPlan, key_columns, missing_ids

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
    #: How the rows were split, and each split's rows per class (classification).
    split: str = "random"
    classes: dict[str, dict[str, int]] | None = None
    #: Cached train and val splits cut into equal shards for every world size the run may
    #: have (data/shards.py); empty when the splits stream.
    shards: dict[str, dict[int, list[ray.data.Dataset]]] = field(default_factory=dict)

    @property
    def target(self) -> TargetSpec:
        return self.preprocessor.target

    def training_target(self, task) -> TargetSpec:
        """The target as training sees it: with the loss's class weights when
        ``task.class_weights`` is balanced (n / (classes x the class's rows))."""
        if task.kind != "classification" or task.class_weights != "balanced":
            return self.target
        if not self.classes:
            raise ValueError("task.class_weights: balanced needs the classes of the rows")
        rows = self.classes["train"]
        counts = [max(rows.get(name, 0), 1) for name in self.target.classes]
        weights = tuple(sum(counts) / (len(counts) * n) for n in counts)
        return replace(self.target, class_weights=weights)

    def summary(self, task) -> dict:
        """What the data came to and how training weighs it (``task``: the task config),
        for metrics.json, the model card and the console."""
        weights = getattr(task, "class_weights", "none")
        classes = {"classes": self.classes, "class_weights": weights}
        return {
            "rows": self.sizes,
            "rejected": self.rejected,
            "target": self.target.to_dict(),
            "split": self.split,
            **(classes if self.classes else {}),
            "augmented": self.augmenting,
        }

    def trainer_datasets(self) -> dict[str, ray.data.Dataset]:
        """What training reads, each rank its shard (``data_config``). Augmentation
        happens on the workers (train/augment.py), not here."""
        return {"train": self.train, "val": self.val}

    def data_config(self) -> ray.train.DataConfig:
        """How Ray Train deals the splits out (data/shards.py). Cached ones are dealt
        once per worker group and each rank's training blocks come in a new order every
        epoch; streamed ones go through Ray Train's streaming split and are read in a
        new file order every epoch. The orders follow from the experiment's seed, so a
        rerun of a config (a tuned trial's, say) sees its rows in the same order."""
        return ShardPerWorker(self.shards, self.seed) if self.cached else ray.train.DataConfig()

    def one_worker_iterators(self) -> dict[str, ray.data.DataIterator]:
        """What one worker that is not a Ray Train worker (an in-process trial) reads:
        the whole splits, training blocks in ``data_config``'s order for rank 0."""
        train = in_epoch_order(self.train, self.seed, rank=0) if self.cached else self.train
        return {"train": train.iterator(), "val": self.val.iterator()}

    @property
    def augmenting(self) -> bool:
        return bool(self.augment and self.augment.enabled)

    def augment_settings(self) -> dict | None:
        """``augment_batch``'s keyword arguments (train/augment.py), or None: the
        configured augmentations and, for colour jitter, the images' per-channel
        standardisation and largest value."""
        if not self.augmenting:
            return None
        settings = self.augment.model_dump()
        if self.augment.color_jitter:
            image = self.preprocessor
            settings["levels"] = {
                "mean": image.mean,
                "std": image.std,
                "max_value": image.max_value,
            }
        return settings


def _tag(batch, features: Features, group_by: list[str], stratify: bool):
    """Each raw row's reason if it cannot be used (reader rejects come first) and, unless
    the source split it (time series), what the split draws by."""
    reasons = features.reject_reasons(batch)
    if REJECT_COLUMN in batch:
        reasons = first_reason(np.asarray(batch[REJECT_COLUMN], dtype=object), reasons)
    if SPLIT_COLUMN not in batch and features.id_column:
        missing = missing_ids(batch[features.id_column]) & (reasons == "")
        reasons[missing] = f"{features.id_column}: missing id"
    batch[REJECT_COLUMN] = reasons
    if SPLIT_COLUMN not in batch:
        batch.update(key_columns(batch, features, group_by, stratify))
    return features.compact(batch, reasons)


def _split(batch, plan: SplitPlan, drop: list[str]):
    return plan.split_batch(batch, drop)


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


def _tally(batch, features: Features):
    """Rows per (split, reject reason, class) in one batch; rejected rows and rows
    without classes count under the class ""."""
    classes = features.classes(batch)
    frame = pd.DataFrame(
        {
            "split": batch[SPLIT_COLUMN],
            "reason": batch[REJECT_COLUMN],
            "class": "" if classes is None else [c or "" for c in classes],
        }
    )
    frame.loc[frame["reason"] != "", "class"] = ""
    counts = frame.groupby(["split", "reason", "class"]).size().reset_index(name="rows")
    return {name: counts[name].to_numpy() for name in counts.columns}


def _transform(batch, preprocessor: Preprocessor):
    return preprocessor.transform(batch)


def write_rejects(rows: ray.data.Dataset, folder: str, filesystem: pafs.FileSystem) -> None:
    """Rejected rows as Parquet, each with its ``_reject`` reason (and ``_raw`` line), in
    one file: rejects from different blocks can differ in a column's type (a label read
    as a number, or missing where the whole file was unreadable), which one file's
    schema unifies and a folder of files would not."""
    rejected = rows.map_batches(
        _rows, fn_kwargs={"split": None, "rejected": True}, batch_format="numpy"
    )
    rejected.repartition(1).write_parquet(folder, filesystem=filesystem, mode=SaveMode.OVERWRITE)


@dataclass
class RowCounts:
    total: int
    usable: dict[str, int]
    rejected: dict[str, int]  # reason -> rows, most frequent first
    classes: dict[str, dict[str, int]]  # split -> class -> usable rows; {} without classes

    @classmethod
    def of(cls, rows: ray.data.Dataset, features: Features) -> RowCounts:
        tally = rows.map_batches(
            _tally, fn_kwargs={"features": features}, batch_format="numpy"
        ).to_pandas()
        if tally.empty:
            return cls(0, dict.fromkeys(SPLITS, 0), {}, {})
        usable = tally[tally["reason"] == ""]
        per_split = usable.groupby("split")["rows"].sum()
        reasons = tally[tally["reason"] != ""].groupby("reason")["rows"].sum()
        classes = {}
        if (usable["class"] != "").any():
            table = usable.pivot_table("rows", "class", "split", aggfunc="sum", fill_value=0)
            classes = {
                name: {str(c): int(table.at[c, name]) if name in table else 0 for c in table.index}
                for name in SPLITS
            }
        return cls(
            total=int(tally["rows"].sum()),
            usable={name: int(per_split.get(name, 0)) for name in SPLITS},
            rejected={str(r): int(n) for r, n in reasons.sort_values(ascending=False).items()},
            classes=classes,
        )


def _account_for_rejects(
    cfg: ExperimentConfig,
    rows: ray.data.Dataset,
    features: Features,
    folder: str,
    filesystem: pafs.FileSystem,
    written: int = 0,
) -> RowCounts:
    """Count rows; write the rejected ones aside (unless the ``written`` rejects already
    are all of them); fail on too many or on an empty split."""
    counts = RowCounts.of(rows, features)
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


def _in_order(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """``dataset``, set to keep its blocks in the order of its input: cached splits whose
    blocks are listed as they finish would reach training in another order every run."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def _stratified(cfg: ExperimentConfig) -> bool:
    """``split.stratify``, or its default: on unless rows are grouped (a stratified split
    only balances rows that have classes, so it leaves other tasks' splits random)."""
    split = cfg.data.split
    return split.stratify if split.stratify is not None else not split.group_by


def tag_rows(cfg: ExperimentConfig, source: DataSource) -> tuple[ray.data.Dataset, str]:
    """The raw rows with their split and reject reason (before anything is fitted), and
    how they were split, in words. With ``data.cache`` the rows as read are kept in the
    object store, so the split plan's pass and every later one read them from there."""
    split = cfg.data.split
    rows = source.read(shuffle_files=not cfg.data.cache).map_batches(
        _tag,
        fn_kwargs={
            "features": source.features,
            "group_by": split.group_by,
            "stratify": _stratified(cfg),
        },
        batch_format="numpy",
    )
    if cfg.data.cache:
        rows = _in_order(rows).materialize()
    if source.assigns_splits:
        return rows, "by time: the last steps are test"
    keys = rows.map_batches(SplitKeys.of_batch, batch_format="numpy").to_pandas()
    plan = SplitPlan.fit(
        SplitKeys.from_frame(keys), cfg.seed, split.val_fraction, split.test_fraction
    )
    if split.group_by:
        how = f"random by groups of {', '.join(split.group_by)}"
    elif plan.ids_span_classes:
        how = (
            f"random, not stratified: some values of {source.features.id_column} hold rows "
            "of several classes, and rows that share an id share a split"
        )
        logger.warning("data: split %s", how)
    else:
        how = "stratified by class" if plan.stratified else "random"
    keys_only = [c for c in split.group_by if c not in source.features.columns]
    drop = [UNIT_COLUMN, STRATUM_COLUMN, FILE_COLUMN, ROW_COLUMN, *keys_only]
    rows = rows.map_batches(_split, fn_kwargs={"plan": plan, "drop": drop}, batch_format="numpy")
    return rows, f"{how}, seed {cfg.seed}"


def usable_rows(cfg: ExperimentConfig, source: DataSource) -> dict[str, pd.DataFrame]:
    """The raw rows of each split that the features accept, collected to this process in
    one pass: for baselines that must see exactly the rows a model trains or is tested
    on (small data)."""
    rows = tag_rows(cfg, source)[0].map_batches(
        _rows, fn_kwargs={"split": None}, batch_format="numpy"
    )
    frame = rows.to_pandas()
    return {
        split: frame[frame[SPLIT_COLUMN] == split]
        .drop(columns=[SPLIT_COLUMN, REJECT_COLUMN])
        .reset_index(drop=True)
        for split in SPLITS
    }


#: What ``prepare_data`` shows on its progress bar, in order.
PREPARATION_STEPS = [
    "reading and splitting",
    "counting and writing rejects",
    "fitting the preprocessing",
    *(f"transforming {name}" for name in SPLITS),
    "dealing shards to workers",
]


def prepare_data(
    cfg: ExperimentConfig,
    source: DataSource,
    rejects_folder: str,
    filesystem: pafs.FileSystem,
    world_sizes: Iterable[int] | None = None,
) -> PreparedData:
    """Transformed train/val/test datasets of an opened source, and the fitted state.
    Cached splits are cut into shards for ``world_sizes`` (default: the sizes
    ``cfg.scaling`` allows; a search passes those of all its trials).

    Rejected rows go to ``rejects_folder`` on ``filesystem``, with their reasons, before
    anything fails; more than ``data.max_reject_fraction`` of them raises TooManyRejects.
    Rows are counted before fitting (so a split left empty by rejects is named) and again
    after, when the fitted state can refuse more (a class the training split lacks).
    """
    steps = Steps("preparing data", PREPARATION_STEPS)
    steps.start("reading and splitting")
    tagged, split_how = tag_rows(cfg, source)
    steps.start("counting and writing rejects")
    before = _account_for_rejects(cfg, tagged, source.features, rejects_folder, filesystem)
    steps.start("fitting the preprocessing")
    preprocessor = source.features.fit(
        tagged.map_batches(_rows, fn_kwargs={"split": "train"}, batch_format="numpy")
    )
    checked, counts = tagged, before
    if preprocessor.refuses_rows:
        checked = tagged.map_batches(
            _check_fitted, fn_kwargs={"preprocessor": preprocessor}, batch_format="numpy"
        )
        counts = _account_for_rejects(
            cfg,
            checked,
            source.features,
            rejects_folder,
            filesystem,
            written=sum(before.rejected.values()),
        )

    splits = {}
    for name in SPLITS:
        steps.start(f"transforming {name}")
        rows = checked.map_batches(_rows, fn_kwargs={"split": name}, batch_format="numpy")
        transformed = rows.map_batches(
            _transform, fn_kwargs={"preprocessor": preprocessor}, batch_format="numpy"
        )
        splits[name] = _in_order(transformed).materialize() if cfg.data.cache else transformed
    shards = {}
    if cfg.data.cache:
        steps.start("dealing shards to workers")
        splits["train"] = cut_for_training(splits["train"], cfg.seed)
        trained = {name: splits[name] for name in ("train", "val")}
        shards = deal(trained, world_sizes or cfg.scaling.world_sizes)

    prepared = PreparedData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        preprocessor=preprocessor,
        sizes=counts.usable,
        rejected=counts.rejected,
        augment=cfg.data.augment if source.features.augmentable else None,
        cached=cfg.data.cache,
        seed=cfg.seed,
        split=split_how,
        classes=counts.classes or None,
        shards=shards,
    )
    steps.close()
    for line in summary_lines(prepared.summary(cfg.task)):
        logger.info("%s", line)
    return prepared


def summary_lines(summary: dict) -> list[str]:
    """The data summary as console lines: rows per split and how they were split, the
    rejected rows, and each class's share with how uneven the classes are."""
    rows = ", ".join(f"{name} {n}" for name, n in summary["rows"].items())
    lines = [f"data: {rows} rows; split {summary['split']}"]
    if summary["rejected"]:
        lines.append(f"data: {sum(summary['rejected'].values())} rows rejected")
    classes = summary.get("classes")
    if classes:
        train = classes["train"]
        total = sum(train.values())
        shares = ", ".join(f"{c} {n / total:.1%}" for c, n in train.items())
        largest, smallest = max(train.values()), max(min(train.values()), 1)
        lines.append(
            f"data: classes {shares} of training rows; the largest holds "
            f"{largest / smallest:.1f}x the rows of the smallest"
        )
        weights = (
            "each class by the inverse of its share (task.class_weights: balanced)"
            if summary["class_weights"] == "balanced"
            else "every row alike (task.class_weights: balanced would weigh rare classes up)"
        )
        lines.append(f"data: the loss weighs {weights}")
    return lines
