"""Served traffic, recorded for drift checks.

Each model replica keeps the rows it serves (a ``sample_rate`` share of them) in a
bounded buffer: per row the time, the input summaries and prediction values that
``reference.json`` holds, and with ``payloads`` the raw instance as JSON. A background
thread writes the buffer every ``flush_interval_s`` as one Parquet file under
``<storage>/monitoring/<name>/v<N>/traffic/``, named by its first and last rows' times
(``<ms>-<ms>-<replica>.parquet``), and deletes files older than ``retention_hours``. A
monitor reads the files of a time window back.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections import deque

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forgeml.config import TrafficConfig
from forgeml.storage import ModelVersion, Storage

logger = logging.getLogger(__name__)

TIME, PAYLOAD = "time", "payload"


def monitoring_parts(version: ModelVersion, *parts: str) -> tuple[str, ...]:
    """``monitoring/<name>/v<N>/...`` under the storage root: what is recorded and
    reported of a version (``Storage.path`` or ``Storage.uri`` of these parts)."""
    return ("monitoring", version.name, f"v{version.version}", *parts)


def _file_span_ms(path: str) -> tuple[int, int] | None:
    """The times of a traffic file's first and last rows (ms), from its name."""
    parts = path.rsplit("/", 1)[-1].split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


class TrafficRecorder:
    """The recording of one replica. ``record`` is called by the serving path and only
    appends to the buffer; the writer thread does the I/O."""

    def __init__(self, storage: Storage, version: ModelVersion, settings: TrafficConfig):
        self.storage, self.settings = storage, settings
        self.folder = storage.path(*monitoring_parts(version, "traffic"))
        self.replica = uuid.uuid4().hex[:8]
        self.rows: deque[dict] = deque(maxlen=settings.max_buffer_rows)
        self.dropped = 0
        self.rng = np.random.default_rng()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.writer = threading.Thread(target=self._write_periodically, daemon=True)
        self.writer.start()

    def record(
        self,
        inputs: dict[str, np.ndarray],
        predictions: dict[str, np.ndarray],
        instances: list | None = None,
    ) -> None:
        """Keep a sample of a batch's rows: its input summaries, predictions, instances."""
        count = len(next(iter(predictions.values())))
        kept = np.flatnonzero(self.rng.random(count) < self.settings.sample_rate)
        if not len(kept):
            return
        now = time.time()
        columns = {f"input.{k}": v for k, v in inputs.items()}
        columns |= {f"prediction.{k}": v for k, v in predictions.items()}
        with self.lock:
            overflow = len(self.rows) + len(kept) - self.settings.max_buffer_rows
            self.dropped += max(overflow, 0)
            for i in kept:
                row = {name: values[i] for name, values in columns.items()}
                row = {
                    name: v.item() if isinstance(v, np.generic) else v for name, v in row.items()
                }
                row[TIME] = now
                if self.settings.payloads and instances is not None:
                    row[PAYLOAD] = json.dumps(instances[i])
                self.rows.append(row)

    def flush(self) -> None:
        """Write the buffered rows as one Parquet file; drop files past retention."""
        with self.lock:
            rows, dropped = list(self.rows), self.dropped
            self.rows.clear()
            self.dropped = 0
        if dropped:
            logger.warning("traffic recording dropped %d rows: the buffer was full", dropped)
        if rows:
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buffer)
            name = (
                f"{int(rows[0][TIME] * 1000)}-{int(rows[-1][TIME] * 1000)}-{self.replica}.parquet"
            )
            self.storage.write_bytes(f"{self.folder}/{name}", buffer.getvalue())
        oldest = (time.time() - self.settings.retention_hours * 3600) * 1000
        for path in self.storage.list_files(self.folder, ".parquet"):
            span = _file_span_ms(path)
            if span is not None and span[1] < oldest:
                self.storage.fs.delete_file(path)

    def _write_periodically(self) -> None:
        while not self.stopped.wait(self.settings.flush_interval_s):
            try:
                self.flush()
            except Exception:  # a storage hiccup must not end the recording
                logger.exception("writing recorded traffic to %s failed", self.folder)

    def close(self) -> None:
        self.stopped.set()
        self.flush()


def read_traffic(
    storage: Storage, version: ModelVersion, since: float, until: float | None = None
) -> dict[str, np.ndarray]:
    """The recorded rows of a version served from ``since`` to ``until`` (unix seconds),
    by column; categorical values as object arrays."""
    folder = storage.path(*monitoring_parts(version, "traffic"))
    until = until or time.time()
    tables = []
    for path in storage.list_files(folder, ".parquet"):
        span = _file_span_ms(path)
        if span is None or span[0] > until * 1000 or span[1] < since * 1000:
            continue
        table = pq.read_table(path, filesystem=storage.fs)
        times = table.column(TIME).to_numpy()
        keep = (times >= since) & (times <= until)
        if keep.any():
            tables.append(table.filter(pa.array(keep)))
    if not tables:
        return {}
    merged = pa.concat_tables(tables, promote_options="default")
    return {
        name: merged.column(name).to_numpy(zero_copy_only=False) for name in merged.column_names
    }
