"""Data sources: each turns ``data.source`` into files plus the features that read them.

A source is registered by its config ``kind``; adding one touches only this registry.
Table sources read their columns as the feature kind ``data.features`` names
(``kinds.build_features``); a series is read whole and cut into windows that carry
their split (``SeriesSource``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import pyarrow.fs as pafs
import ray.data

from forgeml.config import (
    ExperimentConfig,
    ImageFolderSource,
    NumpySource,
    ParquetSource,
    SeriesFeatures,
    TableSource,
)
from forgeml.data import wafer
from forgeml.data.builtin import (
    BUILTIN_TABLES,
    WAFER_GENERATOR_VERSION,
    cached_dataset,
    write_wafer_dataset,
)
from forgeml.data.images import ImageFeatures
from forgeml.data.kinds import build_features
from forgeml.data.readers import (
    FORMATS,
    IMAGE_EXTENSIONS,
    TABLE_READERS,
    DataSource,
    check_first_file,
    format_of,
    image_file_rows,
    listed_files,
    npz_arrays,
    npz_rows,
    user_files,
)
from forgeml.data.series import series_rows
from forgeml.storage import Storage

logger = logging.getLogger(__name__)


_SOURCES: dict[str, Callable[..., DataSource]] = {}


def register_source(kind: str):
    def decorate(fn: Callable[..., DataSource]) -> Callable[..., DataSource]:
        _SOURCES[kind] = fn
        return fn

    return decorate


def open_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """The files of ``data.source`` (generated or copied into storage first for built-in
    data) and the features that read them; generative tasks read image values as codes."""
    source = _SOURCES[cfg.data.source.kind](cfg, storage)
    if cfg.data.append:
        source = replace(source, paths=[*source.paths, *_appended_files(cfg, storage, source)])
    group_by = cfg.data.split.group_by
    if group_by:
        check_first_file(
            source.filesystem, source.paths[0], source.format, group_by, "data.split.group_by"
        )
        source = replace(source, split_columns=tuple(group_by))
    if cfg.task.draws_images:
        return replace(source, features=replace(source.features, codes=True))
    return source


def _appended_files(cfg: ExperimentConfig, storage: Storage, source: DataSource) -> list[str]:
    """The files of ``data.append``: the source's format, filesystem and columns."""
    if source.format not in TABLE_READERS:
        raise ValueError(
            f"data.append: a {cfg.data.source.kind} source reads its own folder of files; "
            "add the new files there"
        )
    features = cfg.data.features
    series = features is not None and features.kind == "series"
    columns = [features.time, features.value] if series else source.features.columns
    files = []
    for path in cfg.data.append:
        paths, fs = user_files(path, storage, (source.format,), field="data.append")
        if format_of(paths[0]) != source.format:
            raise ValueError(
                f"data.append: {path!r} is not a {source.format} file, as the source is"
            )
        if fs.type_name != source.filesystem.type_name:
            raise ValueError(
                f"data.append: {path!r} is on another filesystem than the source's files "
                f"({source.filesystem.type_name}); put both on one"
            )
        check_first_file(fs, paths[0], source.format, columns)
        files += paths
    return files


@register_source("wafer")
def wafer_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """The built-in wafer dataset, generated once per (size, count, seed) and cached as Parquet."""
    source = cfg.data.source
    spec = {
        "samples_per_class": source.samples_per_class,
        "image_size": source.image_size,
        "shards": source.shards,
        "seed": cfg.seed,
        "generator": WAFER_GENERATOR_VERSION,
    }
    folder = cached_dataset(
        storage,
        "wafer",
        spec,
        lambda folder: write_wafer_dataset(storage, folder, source, cfg.seed),
    )
    return DataSource(
        paths=storage.list_files(folder, ".parquet"),
        filesystem=storage.fs,
        format="parquet",
        features=ImageFeatures(
            id_column="sample_id",
            image_column="image",
            label_column="label",
            image_size=source.image_size,
            class_names=wafer.CLASS_NAMES,
        ),
    )


#: Decoded pixels one image-reading task aims at: each task costs Ray Data tens of
#: milliseconds, as long as decoding a hundred small files, and its rows make a block.
IMAGE_TASK_BYTES = 16 * 2**20


def image_files_per_task(size: int, channels: int) -> int:
    """Image files one reading task decodes: IMAGE_TASK_BYTES of pixels (256 files of
    64x64 RGB, 111 of 224x224 RGB), from 8 to 256."""
    return min(256, max(8, IMAGE_TASK_BYTES // (size * size * channels)))


@register_source("image_folder")
def image_folder_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """Image files, one sub-folder per class, read as grey levels or RGB by a reader of
    our own (a file that cannot be decoded becomes a rejected row, not a failed job)."""
    source: ImageFolderSource = cfg.data.source
    paths, fs, root = listed_files(source.path, storage, IMAGE_EXTENSIONS)
    folders = sorted(
        {
            p[len(root) :].lstrip("/").partition("/")[0]
            for p in paths
            if "/" in p[len(root) :].lstrip("/")
        }
    )
    classes = tuple(source.class_names or folders)
    if len(classes) < 2:
        raise ValueError(
            f"data.source.path: {source.path!r} holds {len(classes)} class folder(s) "
            f"({', '.join(classes) or 'none'}); classification needs at least 2"
        )
    return DataSource(
        paths=paths,
        filesystem=fs,
        format="image",
        features=ImageFeatures(
            "id", "image", "label", source.image_size, classes, 255, channels=source.channels
        ),
        reader=partial(
            image_file_rows,
            root=root,
            size=source.image_size,
            classes=classes,
            channels=source.channels,
        ),
        files_per_task=image_files_per_task(source.image_size, source.channels),
    )


@register_source("numpy")
def numpy_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """Images and labels in .npz files; the image size is the first file's."""
    source: NumpySource = cfg.data.source
    paths, fs, root = listed_files(source.path, storage, (".npz",))
    try:
        images, _ = npz_arrays(fs, paths[0], source.images_key, source.labels_key)
    except ValueError as exc:
        raise ValueError(f"data.source.path: {paths[0]}: {exc}") from None
    size = images.shape[1]
    return DataSource(
        paths=paths,
        filesystem=fs,
        format="npz",
        features=ImageFeatures(
            "id", "image", "label", size, tuple(source.class_names), 255, channels=source.channels
        ),
        reader=partial(
            npz_rows,
            root=root,
            images_key=source.images_key,
            labels_key=source.labels_key,
            size=size,
            channels=source.channels,
        ),
    )


@register_source("parquet")
def parquet_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """User Parquet files of images and labels, local or on S3 with the storage's credentials."""
    source: ParquetSource = cfg.data.source
    paths, fs = user_files(source.path, storage, ("parquet",))
    return DataSource(
        paths=paths,
        filesystem=fs,
        format="parquet",
        features=ImageFeatures(
            id_column=source.id_column,
            image_column=source.image_column,
            label_column=source.label_column,
            image_size=source.image_size,
            class_names=tuple(source.class_names),
            channels=source.channels,
        ),
    )


@register_source("table")
def table_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """CSV, JSON Lines or Parquet files, or a built-in table copied into storage, read as
    ``data.features`` says."""
    paths, fs, fmt = _table_files(cfg.data.source, storage)
    features = build_features(cfg)
    if cfg.data.features.kind != "series":
        check_first_file(fs, paths[0], fmt, features.columns)
        return DataSource(paths, fs, fmt, features, TABLE_READERS[fmt])
    series: SeriesFeatures = cfg.data.features
    check_first_file(fs, paths[0], fmt, [series.time, series.value])
    return SeriesSource(
        paths,
        fs,
        fmt,
        features,
        TABLE_READERS[fmt],
        series=series,
        val_fraction=cfg.data.split.val_fraction,
        test_fraction=cfg.data.split.test_fraction,
    )


@dataclass(frozen=True, kw_only=True)
class SeriesSource(DataSource):
    """Files of (time, value) rows, read as forecast windows that carry their split."""

    series: SeriesFeatures
    val_fraction: float
    test_fraction: float
    assigns_splits = True

    def read(self, shuffle_files: bool = False) -> ray.data.Dataset:
        points = self.read_columns([self.series.time, self.series.value]).to_pandas()
        if points.empty:
            raise ValueError("data.source holds no rows")
        rows = series_rows(points, self.series, self.val_fraction, self.test_fraction)
        return ray.data.from_pandas(rows)


def _table_files(source: TableSource, storage: Storage) -> tuple[list[str], pafs.FileSystem, str]:
    """The files of a table source, their filesystem and their one format."""
    if source.builtin:
        version, write = BUILTIN_TABLES[source.builtin]
        folder = cached_dataset(
            storage,
            source.builtin,
            {"builtin": source.builtin, "version": version},
            lambda folder: write(storage, folder),
        )
        return storage.list_files(folder, ".parquet"), storage.fs, "parquet"
    formats = (source.format,) if source.format != "auto" else tuple(set(FORMATS.values()))
    paths, fs = user_files(source.path, storage, formats)
    found = {source.format} if source.format != "auto" else {format_of(p) for p in paths}
    if None in found:
        raise ValueError(
            f"data.source.format: cannot tell the format of {paths[0]!r} from its name; "
            "set csv, jsonl or parquet"
        )
    if len(found) > 1:
        raise ValueError(
            f"data.source.path: {source.path!r} mixes formats {sorted(found)}; point at one"
        )
    return paths, fs, found.pop()
