"""Hyperparameter search: a Ray Tune experiment whose trials train the base config.

The driver prepares the data once and hands the same Ray Datasets to every trial. A
trial is a function trainable that applies its sampled values to the base config and
either fits a ``TorchTrainer`` (Ray Train V2) with ``EpochReportCallback`` (trial_mode
``train``), or runs the same training loop in its own process with Tune's session as
the worker session (``in_process``: no Train controller to start, and checkpoints that
Tune itself keeps, which Population Based Training needs to copy between trials).
Either way every epoch's metrics reach Tune, so ASHA can stop a poor trial after any
epoch. Stopping a Train trial ends its controller and workers with it; Ray Train's
placement-group cleaner then frees their CPUs, which needs the State API (the Ray
dashboard).

Everything lands under ``<storage>/tune/<experiment>/``: Tune's own state (what
``--resume`` restores), each trial's Train run and checkpoints, ``tune_results.parquet``
(one row per trial), and ``best_config.yaml``. The best trial's best checkpoint is
evaluated and registered like a training run's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import torch
from ray import tune
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
    get_or_create_autoscaling_coordinator,
)
from ray.train.v2._internal.state.state_actor import get_state_actor
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.utils import flatten_dict

from forgeml import console, runtime
from forgeml.config import (
    PBT_MUTABLE,
    ChoiceParam,
    ExperimentConfig,
    GridParam,
    IntParam,
    LogUniformParam,
    RangeParam,
    ScalingConfig,
    SearchParam,
    TuneConfig,
    UniformParam,
    config_from_dict,
    set_path,
)
from forgeml.data.pipeline import PreparedData
from forgeml.launch import Launch, prepare_launch, resolve_run_name
from forgeml.registration import register_checkpoint
from forgeml.storage import ModelVersion, Storage
from forgeml.tracking import close_stopped_trials, run_tracking
from forgeml.train.loop import CHECKPOINT_FILE, train_worker
from forgeml.train.pretrained import load_pretrained
from forgeml.train.trainer import build_trainer, loop_config

logger = logging.getLogger(__name__)

RESULTS_FILE = "tune_results.parquet"
BEST_CONFIG_FILE = "best_config.yaml"
TRIAL_DRIVER_MEMORY = 256 * 1024**2


@dataclass
class TuningOutcome:
    experiment: str
    uri: str
    trials: pd.DataFrame
    best_params: dict[str, Any]
    best_metric: float
    best_config: ExperimentConfig
    version: ModelVersion
    summary: dict
    metrics: dict  # the registered version's metrics.json

    @classmethod
    def of(
        cls,
        experiment: str,
        uri: str,
        trials: pd.DataFrame,
        settings: TuneConfig,
        best: tuple[dict[str, Any], ExperimentConfig],
        version: ModelVersion,
        metrics: dict,
        started: float,
    ) -> TuningOutcome:
        """A finished search whose best trial (its values and config) is registered as
        ``version``, with the summary its console line prints."""
        best_params, best_config = best
        values = trials[settings.metric]
        best_metric = float(values.min() if settings.mode == "min" else values.max())
        summary = {
            "trials": len(trials),
            "states": trials["state"].value_counts().to_dict(),
            "best_metric": {settings.metric: best_metric},
            "best_params": best_params,
            "cpu_seconds": round(float(trials["cpu_seconds"].sum()), 1),
            "wall_s": round(time.monotonic() - started, 1),
            "registered": version.ref,
        }
        return cls(
            experiment=experiment,
            uri=uri,
            trials=trials,
            best_params=best_params,
            best_metric=best_metric,
            best_config=best_config,
            version=version,
            summary=summary,
            metrics=metrics,
        )


def _domain(param: SearchParam):
    if isinstance(param, LogUniformParam):
        return tune.loguniform(param.low, param.high)
    if isinstance(param, UniformParam):
        return tune.uniform(param.low, param.high)
    if isinstance(param, IntParam):
        return tune.randint(param.low, param.high + 1)
    if isinstance(param, GridParam):
        return tune.grid_search(param.values)
    if isinstance(param, ChoiceParam):
        return tune.choice(param.values)
    raise TypeError(f"no Tune domain for {type(param).__name__}")


def trial_config(base: dict, params: dict[str, Any]) -> ExperimentConfig:
    """The base config (without its tune section) with a trial's values set at their paths."""
    raw = json.loads(json.dumps({k: v for k, v in base.items() if k != "tune"}))
    for path, value in params.items():
        set_path(raw, path.split("."), value)
    return config_from_dict(raw, "a trial's config")


def _searcher(settings: TuneConfig, seed: int):
    """The search algorithm, limited to ``max_concurrent_trials`` running trials."""
    seed = settings.search.seed if settings.search.seed is not None else seed
    if settings.search.kind in ("random", "grid"):
        return tune.search.BasicVariantGenerator(
            random_state=seed, max_concurrent=settings.max_concurrent_trials
        )
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if settings.search.kind == "optuna_gp":
        sampler = optuna.samplers.GPSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    return tune.search.ConcurrencyLimiter(
        OptunaSearch(sampler=sampler), max_concurrent=settings.max_concurrent_trials
    )


def _within_bounds(space: dict[str, SearchParam], config: dict) -> dict:
    """PBT scales values by 0.8 or 1.2; keep them inside the searched range."""
    for path, param in space.items():
        if isinstance(param, RangeParam) and path in config:
            config[path] = type(param.low)(min(max(config[path], param.low), param.high))
    return config


def scheduler(settings: TuneConfig, max_t: int, time_attr: str = "epoch"):
    """The trial scheduler. ``time_attr`` counts a trial's progress: a supervised trial's
    own epoch (Tune's iteration count restarts on resume), an RL trial's iteration."""
    scheduler = settings.scheduler
    if scheduler.kind == "none":
        return None
    if scheduler.kind == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=scheduler.perturbation_interval,
            quantile_fraction=scheduler.quantile_fraction,
            resample_probability=scheduler.resample_probability,
            synch=scheduler.synchronous,
            # A list perturbs by moving to a neighbouring value; a domain by scaling.
            hyperparam_mutations={
                path: param.values if isinstance(param, ChoiceParam) else _domain(param)
                for path, param in settings.space.items()
                if path in PBT_MUTABLE
            },
            custom_explore_fn=partial(_within_bounds, settings.space),
        )
    return tune.schedulers.ASHAScheduler(
        time_attr=time_attr,
        max_t=max_t,
        grace_period=min(scheduler.grace_period, max_t),
        reduction_factor=scheduler.reduction_factor,
    )


class EpochReportCallback(TuneReportCallback):
    """Passes a Train trial's end-of-epoch reports to Tune, and only those: a checkpoint
    written inside an epoch at a preemption notice reports no validation score (NaN),
    which a scheduler or searcher must not take for the trial's result."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics[0].get("step", 0):
            return
        super().after_report(run_context, metrics, checkpoint)


class TrialProgress(tune.Callback):
    """The search as forgeml reports it: a line per finished trial (its metric and epochs,
    or iterations) and, on a terminal, a bar over the trials; Tune's own status tables are
    off unless verbose. The bar is made when the search starts, so the callback pickles
    with the search's state. ``key``: where the metric is in a trial's (flattened) result
    when not under its own name; ``counted``: what a trial counts its progress in."""

    def __init__(self, metric: str, key: str | None = None, counted: str = "epoch"):
        self.metric = metric
        self.key = key or metric
        self.counted = counted
        self.bar = None
        self.finished = 0

    def setup(self, total_num_samples: int | None = None, **info):
        self.total = total_num_samples
        self.bar = console.progress(iter(()), "trials", total=total_num_samples)

    def _finished(self, trial, how: str) -> None:
        self.finished += 1
        result = flatten_dict(trial.last_result or {}, delimiter="/")
        value = result.get(self.key)
        scored = f"{self.metric} {value:.4g}" if isinstance(value, float) else "no result"
        logger.info(
            "trial %d/%s %s: %s after %s %ss (%s)",
            self.finished,
            self.total or "?",
            trial.trial_id,
            scored,
            result.get(self.counted, 0),
            self.counted.replace("training_", ""),
            how,
        )
        if self.bar is not None:
            self.bar.update(1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, "failed")

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()

    def __getstate__(self):
        return {**self.__dict__, "bar": None}


def trial_world_sizes(cfg: ExperimentConfig) -> set[int]:
    """Every number of workers a trial may train with: the base config's, and those of
    every value a searched ``scaling.num_workers`` can take."""
    sizes = set(cfg.scaling.world_sizes)
    param = cfg.tune.space.get("scaling.num_workers")
    if param is not None:
        values = (
            param.values if isinstance(param, ChoiceParam) else range(param.low, param.high + 1)
        )
        for value in values:
            sizes.update(ScalingConfig(num_workers=value).world_sizes)
    return sizes


class TuneTrialSession:
    """The training loop's session inside an in-process trial: one worker, Tune reports
    and checkpoints, the search's datasets iterated whole."""

    rank, world_size = 0, 1

    def __init__(self, iterators: dict, use_gpu: bool):
        self.iterators = iterators
        # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU.
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def prepare_model(self, model):
        return model.to(self.device)

    def checkpoint(self):
        return tune.get_checkpoint()

    def dataset(self, name):
        return self.iterators[name]

    def report(self, metrics, checkpoint=None):
        if checkpoint is not None:  # the loop builds Ray Train's class; Tune wants its own
            checkpoint = tune.Checkpoint.from_directory(checkpoint.path)
        tune.report(metrics, checkpoint=checkpoint)

    def preemption_info(self):
        return None  # a trial in this process is Tune's to restart

    def broadcast_from_rank_zero(self, value):
        return value


def run_trial(params: dict, base: dict, data: PreparedData, runs_path: str, tracking: dict) -> None:
    """One trial: the base config with ``params`` applied, trained as a Ray Train run or
    in this process (``tune.trial_mode``).

    A restored Train trial keeps its id, so Train V2 finds its checkpoints and continues;
    an in-process trial continues from the checkpoint Tune hands it.
    """
    cfg = trial_config(base, params)
    storage = Storage(cfg.storage)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    # Tune's own TensorBoard logger already writes every trial's reported metrics into
    # its trial folder; the loop logs the trial to MLflow only.
    tracking = run_tracking(
        tracking | {"tensorboard": False},
        cfg,
        storage,
        f"{runs_path}/{trial_id}",
        trial_id,
        **{"forgeml.tune_experiment": context.get_experiment_name()},
    )
    pretrained = load_pretrained(cfg, storage, data)
    if base["tune"]["trial_mode"] == "in_process":
        session = TuneTrialSession(data.one_worker_iterators(), cfg.scaling.use_gpu)
        train_worker(loop_config(cfg, data, tracking, pretrained), session)
        return
    trainer = build_trainer(
        cfg,
        storage,
        data,
        run_name=trial_id,
        tracking=tracking,
        runs_path=runs_path,
        callbacks=[EpochReportCallback()],
        pretrained=pretrained,
    )
    try:
        trainer.fit()
    finally:  # every attempt of this trial: one lost with its node could not
        release_autoscaler_requests(trial_id)


def release_autoscaler_requests(run_name: str | None = None) -> None:
    """Withdraw what this job's Ray Train runs named ``run_name`` (all of them, when
    None) asked the cluster's autoscaler for.

    Ray Train registers a run's workers with the autoscaling coordinator (Ray Data's,
    shared by the cluster) and withdraws them when its controller shuts down. A run
    inside a Tune trial can leave its request standing, and always does when the
    trial's process is lost with its node (the run's controller dies with it). Until the
    request expires 180 s later, no node it counts is removed, and an elastic run
    started meanwhile sees those resources as taken and waits. Runs are found through
    Train's state actor, which exists with RAY_TRAIN_ENABLE_STATE_TRACKING=1 (in
    RAY_ENV_DEFAULTS and the chart's env); without it nothing is withdrawn. The search
    tests in tests/e2e/test_autoscaling.py and tests/e2e/test_multinode.py (whose retried
    trial withdraws its lost attempt's request) check that nothing is left asked for;
    the withdrawal at a search's end covers a trial lost for good, which none tests."""
    state = get_state_actor()
    if state is None:
        return
    job = ray.get_runtime_context().get_job_id()
    try:
        runs = ray.get(state.get_train_runs.remote()).values()
        coordinator = get_or_create_autoscaling_coordinator()
        for run in runs:
            if run.job_id == job and run_name in (None, run.name):
                ray.get(coordinator.cancel_request.remote(f"train-{run.id}"))
    except ray.exceptions.RayError:  # never in place of the trial's own outcome
        logger.warning("could not withdraw the autoscaler requests of %s", run_name or job)


def search_name(storage: Storage, cfg: ExperimentConfig, resume: bool | str) -> str:
    """The search's experiment name (``--resume``: the one resumed, which must not have
    finished)."""
    name = resolve_run_name(storage, "tune", f"{cfg.name}-tune", resume)
    if resume is not False and storage.exists(storage.path("tune", name, RESULTS_FILE)):
        raise ValueError(
            f"--resume: search {name} has finished; its results are in "
            f"{storage.uri('tune', name, RESULTS_FILE)}"
        )
    return name


def write_results(storage: Storage, experiment_path: str, trials: pd.DataFrame) -> None:
    """One row per trial, as ``tune_results.parquet`` in the search's folder."""
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(trials, preserve_index=False), buffer)
    storage.write_bytes(f"{experiment_path}/{RESULTS_FILE}", buffer.getvalue().to_pybytes())


def _trial_resources(cfg: ExperimentConfig) -> dict:
    """A Train trial only drives a TorchTrainer, whose workers reserve the CPUs and GPUs:
    it holds memory but no CPU, and max_concurrent_trials bounds how many run. An
    in-process trial is the worker, and reserves what one would."""
    if cfg.tune.trial_mode == "train":
        return {"memory": TRIAL_DRIVER_MEMORY}
    return {
        "cpu": cfg.scaling.cpus_per_worker,
        "gpu": 1 if cfg.scaling.use_gpu else 0,
        "memory": TRIAL_DRIVER_MEMORY,
    }


def _max_epochs(cfg: ExperimentConfig) -> int:
    param = cfg.tune.space.get("train.max_epochs")
    if param is None:
        return cfg.train.max_epochs
    return int(max(param.values if isinstance(param, ChoiceParam) else [param.high]))


def _trial_state(result, history: pd.DataFrame, trial: ExperimentConfig, scheduled: bool) -> str:
    """How a trial ended: error, diverged, completed, early_stopped (its own patience ran
    out), pruned (stopped by ASHA) or stopped (by the time budget)."""
    if result.error is not None:
        return "error"
    if history.empty:
        return "stopped"
    last = history.iloc[-1]
    if not all(math.isfinite(last[k]) for k in ("train_loss", "val_loss")):
        return "diverged"
    if last["epoch"] >= trial.train.max_epochs:
        return "completed"
    early = trial.train.early_stopping
    if early.enabled and last["epoch"] - last["best_epoch"] >= early.patience:
        return "early_stopped"
    return "pruned" if scheduled else "stopped"


def searched_trials(results: tune.ResultGrid, storage: Storage) -> dict[str, tuple[str, dict]]:
    """Each trial's id and sampled values, by its folder, from Tune's saved state: a
    searcher's trial ids have their own form (the folder name cannot be split into one),
    and a class trainable's results carry its own config, not the sampled values."""
    analysis = tune.ExperimentAnalysis(
        results.experiment_path, storage_filesystem=None if storage.is_local else storage.fs
    )
    return {Path(trial.path).name: (trial.trial_id, trial.config) for trial in analysis.trials}


def _trial_rows(results, settings: TuneConfig, base: dict, trials: dict) -> pd.DataFrame:
    """One row per trial: its values, best metric, epochs, seconds, CPU-seconds and state.

    Epochs come from the trials' own ``epoch`` reports: after ``--resume`` Tune counts
    a restored trial's iterations from 1 again, while its Train run goes on. A trial's
    last result is taken from Tune's memory when its log lacks it (PBT's decision points).
    """
    rows = []
    for result in results:
        history = result.metrics_dataframe
        history = pd.DataFrame() if history is None else history
        last = result.metrics or {}
        if "epoch" in last and ("epoch" not in history or last["epoch"] > history["epoch"].max()):
            history = pd.concat([history, pd.DataFrame([last])], ignore_index=True)
        trial_id, sampled = trials[Path(result.path).name]
        params = {path: sampled.get(path) for path in settings.space}
        trial = trial_config(base, params)
        seconds = float(history["time_total_s"].max()) if "time_total_s" in history else 0.0
        values = history[settings.metric] if settings.metric in history else pd.Series([])
        best = values.min() if settings.mode == "min" else values.max()
        cpus = trial.scaling.max_workers * trial.scaling.cpus_per_worker
        rows.append(
            {
                "trial_id": trial_id,
                **{f"param.{path}": value for path, value in params.items()},
                settings.metric: float(best) if len(values) else math.nan,
                "epochs": int(history["epoch"].max()) if "epoch" in history else 0,
                "seconds": round(seconds, 2),
                "cpu_seconds": round(seconds * cpus, 2),
                "state": _trial_state(
                    result, history, trial, scheduled=settings.scheduler.kind != "none"
                ),
                "path": result.path,
            }
        )
    return pd.DataFrame(rows)


def _kept_checkpoints(result) -> pd.DataFrame:
    """Paths and metrics of a trial's checkpoints: Tune's own for an in-process trial, the
    Train run's (reported as ``checkpoint_path``) for a Train trial."""
    if result.best_checkpoints:
        return pd.DataFrame(
            [{**metrics, "checkpoint_path": c.path} for c, metrics in result.best_checkpoints]
        )
    history = result.metrics_dataframe
    if "checkpoint_path" not in history:
        return pd.DataFrame(columns=["checkpoint_path"])
    return history.dropna(subset=["checkpoint_path"])


def _best_state(result, cfg: ExperimentConfig, storage: Storage) -> dict:
    """The best trial's checkpoint that training would register: best by the watched metric
    among the checkpoints the trial kept."""
    early = cfg.train.early_stopping
    candidates = _kept_checkpoints(result)
    if early.metric in candidates:
        candidates = candidates.sort_values(early.metric, ascending=early.mode == "min")
    for path in candidates["checkpoint_path"]:
        if storage.exists(f"{path}/{CHECKPOINT_FILE}"):
            checkpoint = ray.train.Checkpoint(path, filesystem=storage.fs)
            with checkpoint.as_directory() as folder:
                return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu")
    raise FileNotFoundError(f"no checkpoint of the best trial survives under {result.path}")


def fit_search(tuner: tune.Tuner, storage: Storage) -> tune.ResultGrid:
    """The search's results; the error of a trial that the storage failed is raised
    (a StorageFailure within ``Storage.failures_named``): a search resumed once the
    storage answers runs that trial again from its last checkpoint, while results that
    went on without it could name a worse best trial."""
    results = tuner.fit()
    for result in results:
        if result.error is not None and storage.failure(result.error) is not None:
            raise result.error
    return results


def search_tuner(
    cfg: ExperimentConfig,
    trainable,
    storage: Storage,
    experiment: str,
    resume: bool | str,
    *,
    metric: str,
    max_t: int,
    reuse_actors: bool,
    progress: TrialProgress,
    time_attr: str = "epoch",
    callbacks: tuple = (),
    **run_options,
) -> tune.Tuner:
    """The search's Tuner: its saved state restored for ``--resume``, else a new search of
    ``cfg.tune.space`` scored by ``metric`` (its key in a trial's results). A trial whose
    own process is lost (its node went) runs again, from its latest checkpoint.
    ``callbacks``: Tune callbacks besides the progress line; ``run_options``: the rest of
    Tune's RunConfig (checkpointing, stop criteria)."""
    settings = cfg.tune
    path = storage.path("tune", experiment)
    filesystem = None if storage.is_local else storage.fs
    runtime.keep_credentials_out_of_trial_envs()
    if resume is not False and tune.Tuner.can_restore(path, filesystem):
        logger.info("resuming search %s", experiment)
        return tune.Tuner.restore(
            path, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    return tune.Tuner(
        trainable,
        param_space={key: _domain(param) for key, param in settings.space.items()},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=settings.mode,
            search_alg=_searcher(settings, cfg.seed),
            scheduler=scheduler(settings, max_t, time_attr),
            num_samples=1 if settings.search.kind == "grid" else settings.num_trials,
            time_budget_s=settings.time_budget_s,
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=experiment,
            callbacks=[progress, *callbacks],
            verbose=None if console.verbose_from_environment() else 0,
            storage_path=storage.path("tune"),
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            **run_options,
        ),
    )


def run_tuning(cfg: ExperimentConfig, resume: bool | str = False) -> TuningOutcome:
    """Search ``cfg.tune.space``, write the results, and register the best trial's model.

    Raises StorageFailure, naming the search, when the storage root fails it or one of
    its trials (full, or unreachable past its retries): nothing is registered, and
    ``--resume`` goes on, Train trials from their last checkpoints, in-process ones from
    where Tune last saved the search."""
    if cfg.tune is None:
        raise ValueError("the config has no tune section; see docs/configuration.md#tune")
    started = time.monotonic()
    settings = cfg.tune
    storage = Storage(cfg.storage)
    search_name(storage, cfg, resume)
    # Trials share the cluster as the search schedules them; each trial's worker group
    # must fit it, which is checked up front unless the search varies the scaling.
    sized_by_trial = any(key.startswith("scaling.") for key in settings.space)
    launch = prepare_launch(
        cfg,
        "tune",
        f"{cfg.name}-tune",
        resume,
        trial_world_sizes(cfg),
        check_placement=not sized_by_trial,
    )
    with storage.failures_named(launch.name):
        return _search(cfg, launch, resume, started)


def _search(
    cfg: ExperimentConfig, launch: Launch, resume: bool | str, started: float
) -> TuningOutcome:
    """``run_tuning`` once the search's data is prepared."""
    settings, storage = cfg.tune, launch.storage
    experiment, experiment_path, data = launch.name, launch.path, launch.data
    load_pretrained(cfg, storage, data)  # a bad init_from or freeze fails here, not per trial
    base = cfg.resolved()
    tracking = launch.tracking
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base,
            data=data,
            runs_path=f"{experiment_path}/trials",
            tracking=tracking,
        ),
        _trial_resources(cfg),
    )
    tuner = search_tuner(
        cfg,
        trainable,
        storage,
        experiment,
        resume,
        metric=settings.metric,
        max_t=_max_epochs(cfg),
        # An in-process trial's actor is kept for the next trial and for a paused trial
        # that resumes (synchronous PBT): no new process that imports the training code
        # each time. A Train trial's actor only starts a run.
        reuse_actors=settings.trial_mode == "in_process",
        progress=TrialProgress(settings.metric),
        # In-process trials checkpoint through Tune; Train trials through Train. PBT
        # keeps them all: a trial may restore from another's checkpoint at any time, and
        # one deleted in between fails that restore.
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None
            if settings.scheduler.kind == "pbt"
            else cfg.train.checkpoint.keep_top_k,
            checkpoint_score_attribute=cfg.train.early_stopping.metric,
            checkpoint_score_order=cfg.train.early_stopping.mode,
        ),
    )
    try:
        results = fit_search(tuner, storage)
    finally:  # a trial lost for good with its node left its run's request too
        release_autoscaler_requests()
    close_stopped_trials(tracking, experiment)
    trials = _trial_rows(results, settings, base, searched_trials(results, storage))
    write_results(storage, experiment_path, trials)
    best = results.get_best_result(settings.metric, settings.mode, scope="all")
    best_params = {path: best.config[path] for path in settings.space}
    best_config = trial_config(base, best_params)
    storage.write_text(f"{experiment_path}/{BEST_CONFIG_FILE}", best_config.to_yaml())
    state = _best_state(best, best_config, storage)
    run = {
        "name": experiment,
        "uri": storage.uri("tune", experiment),
        "trial": best.path,
        "workers": best_config.scaling.num_workers,
        "use_gpu": best_config.scaling.use_gpu,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if pretrained := load_pretrained(best_config, storage, data):
        run["init_from"] = pretrained.record()
    version, metrics = register_checkpoint(
        best_config, storage, data, state, "tuned", state["history"], run
    )
    return TuningOutcome.of(
        experiment,
        storage.uri("tune", experiment),
        trials,
        settings,
        (best_params, best_config),
        version,
        metrics,
        started,
    )
