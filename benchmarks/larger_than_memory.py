"""Stream a dataset many times the Ray object store's size through preprocessing, one
training epoch and evaluation, and measure the machine's peak memory while it runs.

    python benchmarks/larger_than_memory.py [--rows 120000] [--object-store-mb 128]

The data is wafer maps as Parquet (64x64 die codes: 4 KiB a row as read, 16 KiB as
float32 model input) read with ``data.cache: false``, so every pass streams from
storage. The baseline is the same run over a small dataset, in the same script: Ray's
own processes take a few GiB whatever the data, so what matters is how much the peak
grows with the data. Memory is sampled every 0.2 s from /proc: the machine's used
memory (MemTotal - MemAvailable, which counts the object store's shared memory) above
what it was before Ray started, and the largest single Ray process's resident set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from forgeml.config import config_from_dict
from forgeml.data import wafer
from forgeml.runtime import RAY_ENV_DEFAULTS, environment, shutdown, start_embedded_runtime
from forgeml.train.trainer import run_training

IMAGE_SIZE = 64
ROWS_PER_FILE = 9 * 500


def used_bytes() -> int:
    """MemTotal - MemAvailable: what the machine cannot hand to a new process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = {key: int(value.split()[0]) for key, value in fields.items()}
    return (kib["MemTotal"] - kib["MemAvailable"]) * 1024


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def largest_ray_process() -> dict:
    """The largest ``ray::`` process: its name and resident set in bytes, with its parts:
    private memory (RssAnon), mapped files such as objects spilled past the object store
    (RssFile) and shared memory such as the object store itself (RssShmem)."""
    largest = dict.fromkeys(RSS_FIELDS, 0)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes()
            if not command.startswith(b"ray::"):
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        sizes = {k: int(fields[k].split()[0]) * 1024 for k in RSS_FIELDS if k in fields}
        if sizes.get("VmRSS", 0) > largest["VmRSS"]:
            largest = {**largest, **sizes, "process": command.split(b"\0")[0].decode()}
    return largest


class PeakSampler(threading.Thread):
    def __init__(self, baseline: int):
        super().__init__(daemon=True)
        self.baseline, self.peak_used = baseline, 0
        self.peak_process = dict.fromkeys(RSS_FIELDS, 0)
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            self.peak_used = max(self.peak_used, used_bytes() - self.baseline)
            largest = largest_ray_process()
            if largest["VmRSS"] > self.peak_process["VmRSS"]:
                self.peak_process = largest


def write_maps(folder: Path, rows: int) -> int:
    """Generated wafer maps as Parquet files of ROWS_PER_FILE rows; their size on disk."""
    for part, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        generated = wafer.generate(ROWS_PER_FILE // 9, IMAGE_SIZE, seed=part)
        count = min(ROWS_PER_FILE, rows - start)
        table = pa.table(
            {
                "sample_id": np.arange(start, start + count, dtype=np.int64),
                "image": pa.array(
                    [image.tobytes() for image in generated["image"][:count]], pa.binary()
                ),
                "label": generated["label"][:count],
            }
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="none")
        (folder / f"part-{part:05d}.parquet").write_bytes(buffer.getvalue())
    return sum(p.stat().st_size for p in folder.iterdir())


def measure(rows: int, object_store_mb: int) -> dict:
    """One streamed run over ``rows`` generated maps: its peaks, sizes and outcome."""
    mib = 1024 * 1024
    with tempfile.TemporaryDirectory() as root:
        data_dir = Path(root) / "maps"
        data_dir.mkdir()
        on_disk = write_maps(data_dir, rows)
        cfg = config_from_dict(
            {
                "name": "larger-than-memory",
                "storage": {"root": str(Path(root) / "store")},
                "data": {
                    "source": {
                        "kind": "parquet",
                        "path": str(data_dir),
                        "image_size": IMAGE_SIZE,
                        "class_names": list(wafer.CLASS_NAMES),
                    },
                    "cache": False,
                },
                "model": {"kind": "cnn", "width": 8, "depth": 2, "dropout": 0.0},
                "train": {"max_epochs": 1, "batch_size": 256, "early_stopping": {"enabled": False}},
                "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
            }
        )
        sampler = PeakSampler(used_bytes())
        sampler.start()
        started = time.monotonic()
        with environment(RAY_ENV_DEFAULTS):  # the runtime forgeml starts, smaller
            start_embedded_runtime(num_cpus=2, object_store_memory=object_store_mb * mib)
        outcome = run_training(cfg)
        wall = time.monotonic() - started
        shutdown()
        sampler.done.set()
        sampler.join()
    pixels = rows * IMAGE_SIZE * IMAGE_SIZE
    return {
        "rows": rows,
        "parquet_on_disk_mib": round(on_disk / mib),
        "maps_uint8_mib": round(pixels / mib),
        "model_inputs_float32_mib": round(4 * pixels / mib),
        "inputs_over_object_store": round(4 * pixels / (object_store_mb * mib), 1),
        "peak_used_above_baseline_mib": round(sampler.peak_used / mib),
        "peak_largest_ray_process_mib": {
            k: v if k == "process" else round(v / mib) for k, v in sampler.peak_process.items()
        },
        "rows_by_split": outcome.metrics["data"]["rows"],
        "test_accuracy": round(outcome.metrics["test"]["accuracy"], 4),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=120_000)
    parser.add_argument("--baseline-rows", type=int, default=4_500)
    parser.add_argument("--object-store-mb", type=int, default=128)
    args = parser.parse_args()
    small = measure(args.baseline_rows, args.object_store_mb)
    large = measure(args.rows, args.object_store_mb)
    mib = 1024 * 1024
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // mib // 1024
    print(
        json.dumps(
            {
                "benchmark": "larger_than_memory",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {ram} GiB",
                "object_store_mib": args.object_store_mb,
                "baseline_small": small,
                "large": large,
                "data_growth": round(large["rows"] / small["rows"], 1),
                "peak_used_growth_mib": large["peak_used_above_baseline_mib"]
                - small["peak_used_above_baseline_mib"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
