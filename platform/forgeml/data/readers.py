"""Readers of data files, local or on S3: Parquet through Ray Data; CSV, JSON Lines,
image files and NumPy archives through readers of our own, run as a Ray Data map over the
files, that turn a line or file that cannot be read into a rejected row. ``DataSource``
is a set of such files and the ``Features`` that read their columns."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from PIL import Image

from forgeml.data.base import FILE_COLUMN, RAW_COLUMN, REJECT_COLUMN, ROW_COLUMN, Features
from forgeml.data.images import to_channels
from forgeml.storage import Storage

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
    #: Files one reading task reads: one for tables and arrays, which can be large; many
    #: for image files, so that small files do not make a block (and a task in every
    #: later pass) each.
    files_per_task: int = 1

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
            batch_size=self.files_per_task,
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


def image_file_rows(
    fs, path, columns, root: str, size: int, classes: tuple[str, ...], channels: int = 1
):
    """One image file as a row: its grey levels (``channels`` 1) or R, G, B values (3),
    resized to size x size (raw bytes, channels last), the class of its folder, an id from
    its path under ``root``; or a rejected row with the reason. PIL converts: colour to
    grey by luma, grey repeated into RGB, alpha dropped."""
    relative = path[len(root) :].lstrip("/")
    folder, _, name = relative.partition("/")
    if not name or folder not in classes:
        yield _rejected_file(
            path, f"label: {folder!r} is not a class folder ({', '.join(classes)})"
        )
        return
    try:
        with fs.open_input_file(path) as stream, Image.open(io.BytesIO(stream.read())) as image:
            converted = image.convert("RGB" if channels == 3 else "L")
            resized = converted.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized, dtype=np.uint8).tobytes()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        yield _rejected_file(path, f"image: not a readable image ({type(exc).__name__})")
        return
    yield {
        "id": np.array([_stable_id(relative)], dtype=np.uint64),
        "image": np.array([pixels], dtype=object),
        "label": np.array([classes.index(folder)], dtype=np.int64),
    }


def npz_arrays(fs, path: str, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, H, H) or (N, H, H, C) and labels of one .npz file; ValueError
    saying why they are unusable (without the path, which the caller knows)."""
    try:
        with fs.open_input_file(path) as stream:
            arrays = np.load(io.BytesIO(stream.read()), allow_pickle=False)
            images, labels = arrays[images_key], np.asarray(arrays[labels_key])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"not a .npz file with arrays {images_key!r} and {labels_key!r} ({type(exc).__name__})"
        ) from None
    square = images.ndim in (3, 4) and images.shape[1] == images.shape[2]
    if not square or labels.shape != images.shape[:1]:
        raise ValueError(
            "expected square images (N, H, H) or (N, H, H, C) and N labels, "
            f"got {images.shape} and {labels.shape}"
        )
    return images, labels


def npz_rows(
    fs, path, columns, root: str, images_key: str, labels_key: str, size: int, channels: int = 1
):
    """The rows of one .npz file (images as raw bytes, ``channels`` last, converted as
    ``to_channels`` does); the file as one rejected row if its arrays are unusable, an
    image as one if its values are not 0 to 255."""
    try:
        images, labels = npz_arrays(fs, path, images_key, labels_key)
        if images.shape[1] != size:
            raise ValueError(f"images of {images.shape[1]}x{images.shape[2]}, not {size}x{size}")
        flat = images.reshape(len(images), -1)
        bad = ((flat < 0) | (flat > 255)).any(1) if flat.size else np.zeros(0, bool)
        images = to_channels(np.clip(images, 0, 255).astype(np.uint8), channels)
    except ValueError as exc:
        yield _rejected_file(path, f"images: {exc}")
        return
    relative = path[len(root) :].lstrip("/")
    ids = np.array([_stable_id(f"{relative}:{i}") for i in range(len(images))], dtype=np.uint64)
    if (~bad).any():
        yield {
            "id": ids[~bad],
            "image": np.array([image.tobytes() for image in images[~bad]], dtype=object),
            "label": labels[~bad],
        }
    for i in np.flatnonzero(bad):
        rejected = _rejected_file(f"{path}:{i}", "images: values outside 0 to 255")
        rejected["id"] = ids[i : i + 1]
        yield rejected


def _read_files(batch, reader, fs, columns):
    """The rows of each file (batches of NumPy columns, or Arrow tables), numbered in the
    order read: rows that could not be parsed (a reason in ``_reject``) take no number.
    Small NumPy batches of the same columns and types (image files, a row each) are
    joined before they go out: a block each would cost Ray Data more than the reading."""
    pending: list[dict] = []
    pending_rows = 0
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
                continue
            rows = {**rows, **place}
            if pending and _columns(pending[0]) != _columns(rows):
                yield _joined(pending)
                pending, pending_rows = [], 0
            pending.append(rows)
            pending_rows += n
            if pending_rows >= JOINED_ROWS:
                yield _joined(pending)
                pending, pending_rows = [], 0
    if pending:
        yield _joined(pending)


#: Rows of NumPy batches joined into one output of ``_read_files`` at most.
JOINED_ROWS = 256


def _columns(batch: dict) -> list[tuple[str, str]]:
    return [(name, values.dtype.str) for name, values in batch.items()]


def _joined(batches: list[dict]) -> dict:
    if len(batches) == 1:
        return batches[0]
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


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


def user_files(
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
        if i.type == pafs.FileType.File and format_of(i.path) in formats
    )
    if not found:
        raise FileNotFoundError(f"{field}: no {'/'.join(formats)} files under {path!r}")
    return found, fs


def format_of(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


#: What an image folder may hold; other files are left alone.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def listed_files(path: str, storage: Storage, extensions: tuple[str, ...]):
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


def check_first_file(
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
