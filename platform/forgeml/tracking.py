"""Experiment tracking: TensorBoard event files in every run's folder and, with
``tracking.mlflow``, an MLflow run per training run or tuning trial.

Rank 0 of the training loop logs each epoch as it ends (``EpochLogger``), so curves grow
while a run trains; the driver adds the registered package's test metrics and files
(``log_registration``). The driver also opens the MLflow experiment before training
(``open_tracking``): a wrong URI fails the job early, and concurrent trials never race to
create the store.

The MLflow client is used directly rather than Ray's ``setup_mlflow``, which always
starts a new run: a restarted worker group, ``--resume`` and a restored trial continue
their own run, whose id the checkpoint carries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path

from forgeml.config import ExperimentConfig
from forgeml.storage import ModelRegistry, Storage

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
#: Params in one MLflow log_batch call (the store's limit).
MLFLOW_PARAMS_PER_BATCH = 100
#: MLflow refuses longer param values.
MLFLOW_PARAM_CHARS = 6000


def flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted paths to the leaves of a nested mapping; lists stay whole values."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The finite numbers among (nested) metrics, by dotted path: what a tracker plots."""
    return {
        path: float(value)
        for path, value in flatten(metrics).items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as flat string params (lists and nulls as JSON)."""
    return {
        path: value if isinstance(value, str) else json.dumps(value)
        for path, value in flatten(cfg.model_dump(mode="json")).items()
    }


def mlflow_uri(cfg: ExperimentConfig, storage: Storage) -> str:
    """``tracking.mlflow.tracking_uri``, else $MLFLOW_TRACKING_URI, else an sqlite file
    in a local storage root."""
    configured = cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    if not storage.is_local:
        raise ValueError(
            f"tracking.mlflow.tracking_uri: storage.root is {storage.uri()}, where an sqlite "
            "store cannot live; give a tracking server's URI (or set MLFLOW_TRACKING_URI)"
        )
    return f"sqlite:///{storage.path('mlflow.db')}"


def open_tracking(cfg: ExperimentConfig, storage: Storage) -> dict:
    """Where a job's runs log, opened once by the driver: whether to write TensorBoard
    files, and the MLflow store and experiment (created here if missing)."""
    store = {
        "tensorboard": cfg.tracking.tensorboard,
        "mlflow_uri": None,
        "mlflow_experiment_id": None,
    }
    if cfg.tracking.mlflow is None:
        return store
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = mlflow_uri(cfg, storage)
    name = cfg.tracking.mlflow.experiment or cfg.name
    default_store = uri == f"sqlite:///{storage.path('mlflow.db')}"
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = Path(storage.path("mlartifacts")).as_uri() if default_store else None
            experiment_id = client.create_experiment(name, artifact_location=artifacts)
    except MlflowException as exc:
        raise ValueError(f"tracking.mlflow: cannot use the store {uri}: {exc.message}") from None
    logger.info("logging to MLflow experiment %r at %s", name, uri)
    return store | {"mlflow_uri": uri, "mlflow_experiment_id": experiment_id}


def run_tracking(
    store: dict, cfg: ExperimentConfig, storage: Storage, run_dir: str, run_name: str, **tags
) -> dict:
    """What the training loop needs to log one run (a training run or a trial) whose
    folder is the storage path ``run_dir``."""
    return {
        "run_name": run_name,
        "tensorboard_dir": f"{run_dir}/{TENSORBOARD_DIR}" if store["tensorboard"] else None,
        "mlflow_uri": store["mlflow_uri"],
        "mlflow_experiment_id": store["mlflow_experiment_id"],
        "tags": {
            "forgeml.experiment": cfg.name,
            "forgeml.run_dir": run_dir if storage.is_local else f"s3://{run_dir}",
            **tags,
        },
    }


#: How soon tensorboardX's writer thread flushes an event it has written.
FLUSH_SECONDS = 0.1


class TensorBoardWriter:
    """A tensorboardX writer whose event files land in a storage folder: written in
    place on a local root, or in a local folder copied up after every flush on S3."""

    def __init__(self, storage: Storage, folder: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.storage, self.folder = storage, folder
        self._staging = None if storage.is_local else tempfile.TemporaryDirectory()
        logdir = folder if storage.is_local else self._staging.name
        # A unique suffix: a restart within the same second would otherwise reuse the
        # file name (time and host) and, on S3, overwrite the earlier attempt's file.
        # tensorboardX writes events on a thread of its own, and its flush() does not wait
        # for that thread: with a long interval, the last events of an epoch stayed in a
        # buffer until the next epoch, and a worker killed after its checkpoint lost them.
        # The thread now flushes within FLUSH_SECONDS of writing.
        self.writer = SummaryWriter(
            logdir=logdir,
            purge_step=purge_step,
            flush_secs=FLUSH_SECONDS,
            filename_suffix=f".{uuid.uuid4().hex[:8]}",
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.flush()

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        self.writer.add_hparams(params, metrics, name="hparams")
        self.flush()

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def flush(self) -> None:
        self.writer.flush()
        if self._staging is not None:
            for path in Path(self._staging.name).rglob("events.out.tfevents.*"):
                relative = path.relative_to(self._staging.name).as_posix()
                self.storage.write_bytes(f"{self.folder}/{relative}", path.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self._staging is not None:
            self._staging.cleanup()


class EpochLogger:
    """Rank 0's log of one run: each epoch's record as TensorBoard scalars and MLflow
    metrics (step = epoch). ``state`` goes into every checkpoint, so a run restarted
    from one keeps logging into the same MLflow run."""

    def __init__(self, settings: dict, cfg: ExperimentConfig, resumed: dict | None, epoch: int):
        self.settings = settings
        storage = Storage(cfg.storage)
        self.tensorboard = None
        if settings["tensorboard_dir"]:
            # A restart drops the events that the failed attempt logged after its checkpoint.
            purge = epoch if resumed else None
            self.tensorboard = TensorBoardWriter(storage, settings["tensorboard_dir"], purge)
            if not resumed:
                self.tensorboard.text("config", f"```\n{cfg.to_yaml()}```")
        self.client = self.run_id = None
        if settings["mlflow_uri"]:
            from mlflow import MlflowClient

            self.client = MlflowClient(settings["mlflow_uri"])
            same_run = resumed and resumed.get("run_name") == settings["run_name"]
            if same_run and resumed.get("mlflow_run_id"):
                self.run_id = resumed["mlflow_run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:  # a fresh run, or a PBT trial continuing another trial's checkpoint
                self.run_id = self._create_run(cfg)

    def _create_run(self, cfg: ExperimentConfig) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(
            self.settings["mlflow_experiment_id"],
            run_name=self.settings["run_name"],
            tags=self.settings["tags"],
        )
        params = [
            Param(path, value[:MLFLOW_PARAM_CHARS]) for path, value in config_params(cfg).items()
        ]
        for start in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            batch = params[start : start + MLFLOW_PARAMS_PER_BATCH]
            self.client.log_batch(run.info.run_id, params=batch)
        return run.info.run_id

    @property
    def state(self) -> dict:
        return {
            "run_name": self.settings["run_name"],
            "mlflow_uri": self.settings["mlflow_uri"],
            "mlflow_run_id": self.run_id,
            "tensorboard_dir": self.settings["tensorboard_dir"],
        }

    def log_epoch(self, record: dict) -> None:
        epoch = record["epoch"]
        values = {k: v for k, v in scalar_metrics(record).items() if k != "epoch"}
        if self.tensorboard:
            self.tensorboard.scalars(values, epoch)
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(name, value, now, epoch) for name, value in values.items()]
            self.client.log_batch(self.run_id, metrics=metrics)

    def close_tensorboard(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()

    def close(self, status: str) -> None:
        """End the run: ``status`` diverged or failed ends it FAILED in MLflow, killed
        (stopped before its limits) KILLED, any other FINISHED."""
        self.close_tensorboard()
        if self.client:
            ended = {"diverged": "FAILED", "failed": "FAILED", "killed": "KILLED"}
            self.client.set_terminated(self.run_id, status=ended.get(status, "FINISHED"))


def close_stopped_trials(store: dict, tune_experiment: str) -> None:
    """Mark the MLflow runs of a search's trials that Tune stopped (their workers end
    without closing them) as killed."""
    if not store["mlflow_uri"]:
        return
    from mlflow import MlflowClient

    client = MlflowClient(store["mlflow_uri"])
    running = client.search_runs(
        [store["mlflow_experiment_id"]],
        filter_string=f"tags.`forgeml.tune_experiment` = '{tune_experiment}' "
        "and attributes.status = 'RUNNING'",
    )
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")


def log_registration(
    cfg: ExperimentConfig,
    tracked: dict | None,
    ref: str,
    metrics: dict,
    files: dict[str, bytes],
) -> None:
    """Add a registered package to the run that trained it: its test metrics (TensorBoard
    hparams beside the config's values; MLflow metrics) and, in MLflow, its files."""
    if not tracked:
        return
    test = {f"test/{name}": value for name, value in scalar_metrics(metrics["test"]).items()}
    for row in metrics.get("baseline", {}).get("compared", []):
        test[f"baseline/{row['metric']}"] = row["baseline"]
    storage = Storage(cfg.storage)
    if tracked.get("tensorboard_dir"):
        params = {
            path: value
            for path, value in flatten(cfg.model_dump(mode="json")).items()
            if isinstance(value, (int, float, str, bool))
        }
        writer = TensorBoardWriter(storage, tracked["tensorboard_dir"])
        writer.hparams(params, test)
        writer.close()
    if tracked.get("mlflow_run_id"):
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(tracked["mlflow_uri"])
        run_id = tracked["mlflow_run_id"]
        now = int(time.time() * 1000)
        step = int(metrics["best_epoch"])
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in test.items()])
        client.set_tag(run_id, "forgeml.model_version", ref)
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                Path(folder, name).write_bytes(data)
            client.log_artifacts(run_id, folder, artifact_path="model_package")


def _package(registry: ModelRegistry, version) -> tuple[dict, dict]:
    """A registered version's metrics and resolved config, as plain mappings."""
    import yaml

    metrics = json.loads(registry.read(version, "metrics.json"))
    config = yaml.safe_load(registry.read(version, "config.yaml"))
    return metrics, config


def _best_selected(metrics: dict) -> tuple[str, float | None]:
    """The metric a version was selected by, and its value at the kept epoch."""
    selected = metrics["selected_by"]["metric"]
    best = metrics["best_epoch"]
    record = next((r for r in metrics["history"] if r["epoch"] == best), {})
    return selected, record.get(selected)


def worse_than_baseline(metrics: dict) -> list[str] | None:
    """The headline metrics on which a version does worse than its baseline; None
    when it has no baseline."""
    baseline = metrics.get("baseline")
    if baseline is None:
        return None
    return [row["metric"] for row in baseline["compared"] if row["worse"]]


def worse_text(worse: list[str] | None) -> str:
    """``worse_than_baseline`` in words: the metrics, "no", or "-" without a baseline."""
    if worse is None:
        return "-"
    return ", ".join(worse) or "no"


def run_summaries(registry: ModelRegistry, names: list[str] | None = None) -> list[dict]:
    """One row per registered version (oldest first per model): how its run went and
    what it scored, from the package alone."""
    rows = []
    for name in names or registry.models():
        for number in registry.versions(name):
            version = registry.resolve(f"{name}:v{number}")
            metrics, config = _package(registry, version)
            selected, value = _best_selected(metrics)
            rows.append(
                {
                    "model": version.ref,
                    "registered_at": metrics.get("registered_at"),
                    "run": metrics["run"]["name"],
                    "status": metrics["status"],
                    "epochs": len(metrics["history"]),
                    "best_epoch": metrics["best_epoch"],
                    "selected_by": selected,
                    "selected_value": value,
                    "task": config["task"]["kind"],
                    "model_kind": config["model"]["kind"],
                    "wall_s": metrics["run"].get("wall_s"),
                    "test": scalar_metrics(metrics["test"]),
                    "worse_than_baseline": worse_than_baseline(metrics),
                }
            )
    return rows


def compare_runs(
    registry: ModelRegistry, refs: list[str], every_param: bool = False
) -> dict[str, list]:
    """Versions side by side: row label to one value per version. Rows: how the run
    went, every scalar test metric, the baseline's headline metrics and whether the
    version does worse than it, then the config values that differ between the versions
    (all of them with ``every_param``)."""
    versions = [registry.resolve(ref) for ref in refs]
    packages = [_package(registry, version) for version in versions]
    rows: dict[str, list] = {"model": [v.ref for v in versions]}
    for label, read in (
        ("registered_at", lambda m: m.get("registered_at")),
        ("run", lambda m: m["run"]["name"]),
        ("status", lambda m: m["status"]),
        ("epochs", lambda m: len(m["history"])),
        ("best_epoch", lambda m: m["best_epoch"]),
        ("wall_s", lambda m: m["run"].get("wall_s")),
    ):
        rows[label] = [read(metrics) for metrics, _ in packages]
    tests = [scalar_metrics(metrics["test"]) for metrics, _ in packages]
    for name in sorted({name for test in tests for name in test}):
        rows[f"test.{name}"] = [test.get(name) for test in tests]
    baselines = [metrics.get("baseline") for metrics, _ in packages]
    if any(baselines):
        rows["baseline"] = [b and b["model"] for b in baselines]
        compared = [
            {r["metric"]: r["baseline"] for r in b["compared"]} if b else {} for b in baselines
        ]
        for name in dict.fromkeys(name for scores in compared for name in scores):
            rows[f"baseline.{name}"] = [scores.get(name) for scores in compared]
        rows["worse_than_baseline"] = [
            worse_text(worse_than_baseline(metrics)) for metrics, _ in packages
        ]
    configs = [flatten(config) for _, config in packages]
    for path in sorted({path for config in configs for path in config}):
        values = [config.get(path) for config in configs]
        if every_param or any(value != values[0] for value in values):
            rows[f"config.{path}"] = values
    return rows
