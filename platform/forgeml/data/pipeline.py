"""The Ray Data pipeline: read -> decode -> split -> fit normalisation on train -> augment train.

Everything here is lazy Ray Data until ``prepare_data`` fits the preprocessor (one
pass over the training split) and, when ``data.cache`` is on, materialises the
normalised splits so epochs read from the object store instead of storage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import ray
import ray.data

from forgeml.config import AugmentConfig, ExperimentConfig
from forgeml.data.preprocessing import (
    WaferPreprocessor,
    assign_split,
    augment,
    decode_images,
)
from forgeml.data.sources import TableSource

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Normalised splits (not augmented) and the state fitted on the training split."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    preprocessor: WaferPreprocessor
    class_names: tuple[str, ...]
    sizes: dict[str, int]
    augment: AugmentConfig

    def as_trainer_datasets(self) -> dict[str, ray.data.Dataset]:
        """What the TorchTrainer streams: train shuffled by block and augmented, val as is."""
        train = self.train.randomize_block_order()
        if self.augment.rotate90 or self.augment.flip:
            train = train.map_batches(
                _augment,
                fn_kwargs={"rotate90": self.augment.rotate90, "flip": self.augment.flip},
                batch_format="numpy",
            )
        return {"train": train, "val": self.val}


def _decode_split(batch, source: TableSource, split: str, seed: int, val: float, test: float):
    """Rows of one split with images as (N, size, size) uint8 and validated labels."""
    ids = np.asarray(batch[source.id_column])
    keep = assign_split(ids, seed, val, test) == split
    labels = np.asarray(batch[source.label_column])[keep].astype(np.int64)
    n_classes = len(source.class_names)
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        raise ValueError(
            f"column {source.label_column!r}: label {labels[bad][0]} outside 0..{n_classes - 1}"
        )
    images = decode_images(batch[source.image_column][keep], source.image_size, source.image_column)
    return {"image": images, "label": labels}


def _pixel_moments(batch):
    x = batch["image"].astype(np.float64)
    return {"n": [x.size], "s": [x.sum()], "ss": [np.square(x).sum()]}


def _normalise(batch, preprocessor: WaferPreprocessor):
    batch["image"] = preprocessor.transform(batch["image"])
    return batch


def _augment(batch, rotate90: bool, flip: bool):
    # Unseeded on purpose: every epoch and every block must see fresh transforms.
    batch["image"] = augment(batch["image"], rotate90, flip, np.random.default_rng())
    return batch


def read_split(source: TableSource, cfg: ExperimentConfig, split: str) -> ray.data.Dataset:
    ds = ray.data.read_parquet(
        source.paths,
        filesystem=source.filesystem,
        columns=[source.id_column, source.image_column, source.label_column],
    )
    return ds.map_batches(
        _decode_split,
        fn_kwargs={
            "source": source,
            "split": split,
            "seed": cfg.seed,
            "val": cfg.data.split.val_fraction,
            "test": cfg.data.split.test_fraction,
        },
        batch_format="numpy",
    )


def prepare_data(cfg: ExperimentConfig, source: TableSource) -> PreparedData:
    """Normalised train/val/test datasets of an opened source, and the fitted state."""
    raw = {split: read_split(source, cfg, split) for split in ("train", "val", "test")}

    moments = raw["train"].map_batches(_pixel_moments, batch_format="numpy").sum(["n", "s", "ss"])
    if not moments or not moments["sum(n)"]:
        raise ValueError("the training split is empty: add data or lower the split fractions")
    preprocessor = WaferPreprocessor.from_moments(
        source.image_size, moments["sum(n)"], moments["sum(s)"], moments["sum(ss)"]
    )

    splits = {}
    for name, ds in raw.items():
        normalised = ds.map_batches(
            _normalise, fn_kwargs={"preprocessor": preprocessor}, batch_format="numpy"
        )
        splits[name] = normalised.materialize() if cfg.data.cache else normalised
    sizes = {name: ds.count() for name, ds in splits.items()}
    for name, size in sizes.items():
        if size == 0:
            raise ValueError(f"the {name} split is empty: add data or change data.split")

    logger.info("data: %s", ", ".join(f"{k} {v} rows" for k, v in sizes.items()))
    return PreparedData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        preprocessor=preprocessor,
        class_names=source.class_names,
        sizes=sizes,
        augment=cfg.data.augment,
    )
