"""Data sources: each turns a source config into Parquet files plus what they hold.

A source is registered by its config ``kind``; adding one touches only this registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from forgeml.config import ParquetSource, WaferSource
from forgeml.data import wafer
from forgeml.storage import COMPLETE_MARKER, Storage

logger = logging.getLogger(__name__)

# Bump when the generator's output changes, so cached datasets are regenerated.
WAFER_GENERATOR_VERSION = 1


@dataclass(frozen=True)
class TableSource:
    """Parquet files that hold square images and integer labels."""

    paths: list[str]
    filesystem: pafs.FileSystem
    id_column: str
    image_column: str
    label_column: str
    image_size: int
    class_names: tuple[str, ...]


_SOURCES: dict[str, Callable[..., TableSource]] = {}


def register_source(kind: str):
    def decorate(fn: Callable[..., TableSource]) -> Callable[..., TableSource]:
        _SOURCES[kind] = fn
        return fn

    return decorate


def open_source(cfg, storage: Storage, seed: int) -> TableSource:
    return _SOURCES[cfg.kind](cfg, storage, seed)


@register_source("wafer")
def wafer_source(cfg: WaferSource, storage: Storage, seed: int) -> TableSource:
    """The built-in wafer dataset, generated once per (size, count, seed) and cached as Parquet."""
    spec = {
        "samples_per_class": cfg.samples_per_class,
        "image_size": cfg.image_size,
        "shards": cfg.shards,
        "seed": seed,
        "generator": WAFER_GENERATOR_VERSION,
    }
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = storage.path("datasets", "wafer", fingerprint)
    if not storage.exists(f"{folder}/{COMPLETE_MARKER}"):
        write_wafer_dataset(storage, folder, cfg, seed)
        storage.write_text(f"{folder}/spec.json", json.dumps(spec, indent=2))
        storage.write_text(f"{folder}/{COMPLETE_MARKER}", fingerprint)
    return TableSource(
        paths=storage.list_files(folder, ".parquet"),
        filesystem=storage.fs,
        id_column="sample_id",
        image_column="image",
        label_column="label",
        image_size=cfg.image_size,
        class_names=wafer.CLASS_NAMES,
    )


def write_wafer_dataset(storage: Storage, folder: str, cfg: WaferSource, seed: int) -> None:
    logger.info("generating wafer dataset (%d maps) into %s", 9 * cfg.samples_per_class, folder)
    rows = wafer.generate(cfg.samples_per_class, cfg.image_size, seed)
    pixels = cfg.image_size * cfg.image_size
    for shard, index in enumerate(np.array_split(np.arange(len(rows["label"])), cfg.shards)):
        images = rows["image"][index]
        table = pa.table(
            {
                "sample_id": rows["sample_id"][index],
                "image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), pixels),
                "label": rows["label"][index],
            }
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(f"{folder}/part-{shard:05d}.parquet", buffer.getvalue())


@register_source("parquet")
def parquet_source(cfg: ParquetSource, storage: Storage, seed: int) -> TableSource:
    """User Parquet data (a file or a folder), local or on S3 with the storage's credentials."""
    fs = storage.fs if cfg.path.startswith("s3://") else pafs.LocalFileSystem()
    path = cfg.path[len("s3://") :] if cfg.path.startswith("s3://") else cfg.path
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.source.path: no such file or folder {cfg.path!r}")
    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(path, recursive=True)
        paths = sorted(i.path for i in fs.get_file_info(selector) if i.path.endswith(".parquet"))
        if not paths:
            raise FileNotFoundError(f"data.source.path: no .parquet files under {cfg.path!r}")
    else:
        paths = [path]
    return TableSource(
        paths=paths,
        filesystem=fs,
        id_column=cfg.id_column,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        image_size=cfg.image_size,
        class_names=tuple(cfg.class_names),
    )
