"""Serve the wafer classifier, shift its traffic, and watch the monitor catch it.

    python examples/wafer/drift_demo.py [--storage-root DIR] [--windows 10] [--rows 500]

1. Trains `examples/wafer/config.yaml` if the storage has no `wafer-cnn` yet, and serves
   it on an embedded Ray runtime (Serve on 127.0.0.1, recording traffic every second).
2. Sends `--windows` windows of `--rows` maps drawn like the training maps and checks each
   window for drift: how often an unshifted window raises a false alarm.
3. Sends one window of shifted maps: 60% edge-ring (against 11% in training) on a
   noisier line (10% of the good dies failed at random on top of the usual 0-5%), checks
   it, and on the alarm submits a retraining job through Ray's Jobs API with newly
   labelled maps of the shifted kind appended (`data.append`); waits for it.

Prints one JSON object: each window's verdict and largest PSI, the shifted window's
report, the retraining job and the version it registered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import requests
from forgeml.config import StorageConfig, load_config
from forgeml.data.wafer import CLASS_NAMES, DEFECT, GOOD, generate_map
from forgeml.monitor.check import DriftGauges, check
from forgeml.runtime import RAY_ENV_DEFAULTS
from forgeml.serve.deploy import AppArgs, deploy
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.trainer import run_training
from ray import serve
from ray.job_submission import JobStatus, JobSubmissionClient

HERE = Path(__file__).parent
MODEL = "wafer-cnn"
EDGE_RING = CLASS_NAMES.index("edge-ring")
#: The shifted line: this share of edge-ring maps, and of good dies failed at random.
SHIFT_EDGE_RING, SHIFT_NOISE = 0.6, 0.10
DASHBOARD_PORT, SERVE_PORT = 8265, 8000


def maps(count: int, rng: np.random.Generator, shifted: bool, size: int) -> tuple:
    """Maps and labels drawn like the training set (class-balanced) or shifted."""
    if shifted:
        others = [i for i in range(len(CLASS_NAMES)) if i != EDGE_RING]
        labels = np.where(rng.random(count) < SHIFT_EDGE_RING, EDGE_RING, rng.choice(others, count))
    else:
        labels = rng.integers(0, len(CLASS_NAMES), count)
    images = np.stack([generate_map(int(label), size, rng) for label in labels])
    if shifted:
        noise = (images == GOOD) & (rng.random(images.shape) < SHIFT_NOISE)
        images[noise] = DEFECT
    return images, labels


def serve_window(url: str, images: np.ndarray) -> tuple[float, float]:
    """POST the maps 100 at a time; the window's first and last second."""
    started = time.time()
    with requests.Session() as session:
        for start in range(0, len(images), 100):
            batch = [{"image": image.tolist()} for image in images[start : start + 100]]
            response = session.post(url, json={"instances": batch}, timeout=120)
            response.raise_for_status()
    return started, time.time()


def checked(storage: Storage, window: tuple[float, float], overrides: list[str], gauges) -> dict:
    """Check one window, once the replica has written it (it writes every second)."""
    started, ended = window
    time.sleep(2.5)
    minutes = (ended - started) / 60 + 1 / 60
    return check(
        storage, MODEL, [f"monitor.window_minutes={minutes}", *overrides], gauges, now=ended + 1
    )


def appended_maps(folder: Path, rng: np.random.Generator, size: int) -> Path:
    """900 newly labelled maps of the shifted kind, in the wafer source's own layout."""
    images, labels = maps(900, rng, shifted=True, size=size)
    table = pa.table(
        {
            "sample_id": np.arange(10_000_000, 10_000_000 + len(labels)),
            "image": pa.array([image.tobytes() for image in images], pa.binary()),
            "label": labels.astype(np.int64),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "labelled-shifted-maps.parquet")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=None, help="default: the config's root")
    parser.add_argument("--windows", type=int, default=10, help="unshifted windows checked")
    parser.add_argument("--rows", type=int, default=500, help="maps per window")
    args = parser.parse_args()
    overrides = [f"storage.root={args.storage_root}"] if args.storage_root else []
    cfg = load_config(HERE / "config.yaml", overrides)
    storage = Storage(StorageConfig(root=cfg.storage.root))
    size = cfg.data.source.image_size

    os.environ.update(
        {**RAY_ENV_DEFAULTS, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    )
    # Four logical CPUs on two cores: the served model and its gateway hold two, and
    # the retraining job needs its own (on a cluster, the autoscaler adds them).
    ray.init(
        num_cpus=4, include_dashboard=True, dashboard_port=DASHBOARD_PORT, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ModelRegistry(storage).versions(MODEL):
        run_training(cfg)
    version = ModelRegistry(storage).resolve(MODEL)
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    deploy(
        AppArgs(
            models=[version.ref],
            storage=cfg.storage,
            auth=False,
            overrides=["serve.traffic.flush_interval_s=1"],
        )
    )
    url = f"http://127.0.0.1:{SERVE_PORT}/v1/models/{MODEL}/predict"
    gauges = DriftGauges()
    rng = np.random.default_rng(2026)

    unshifted = []
    for _ in range(args.windows):
        window = serve_window(url, maps(args.rows, rng, shifted=False, size=size)[0])
        report = checked(storage, window, [], gauges)
        unshifted.append(
            {
                "status": report["status"],
                "rows": report["rows"],
                "max_psi": round(report["max_psi"], 4),
            }
        )

    workdir = Path(tempfile.mkdtemp(prefix="drift-demo-"))
    new_data = appended_maps(workdir / "new-maps", rng, size)
    dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
    retrain = (
        f"monitor.retrain={{submit_to: ray, ray_address: '{dashboard}', append: ['{new_data}']}}"
    )
    window = serve_window(url, maps(args.rows, rng, shifted=True, size=size)[0])
    report = checked(storage, window, [retrain], gauges)

    outcome = {}
    if report["alarm"]:
        job = report["retrain"]["job"]
        client = JobSubmissionClient(dashboard)
        started = time.monotonic()
        while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            time.sleep(5)
        registry = ModelRegistry(storage)
        latest = registry.resolve(MODEL)
        metrics = json.loads(registry.read(latest, "metrics.json"))
        outcome = {
            "job": job,
            "status": status.value,
            "wall_s": round(time.monotonic() - started, 1),
            "registered": latest.ref,
            "rows": metrics["data"]["rows"],
            "test_accuracy": round(metrics["test"]["accuracy"], 4),
        }
    serve.shutdown()
    ray.shutdown()
    summary = {
        "example": "wafer drift",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "served": version.ref,
        "unshifted_windows": unshifted,
        "false_alarms": sum(w["status"] == "drift" for w in unshifted),
        "shifted_window": {
            "status": report["status"],
            "rows": report["rows"],
            "drifted": report["drifted"],
            "values": {
                name: {
                    key: round(value, 4) if isinstance(value, float) else value
                    for key, value in result.items()
                    if key in ("test", "statistic", "p_value", "psi", "drifted")
                }
                for name, result in report["values"].items()
            },
            "report": report["report_uri"],
        },
        "retraining": outcome,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
