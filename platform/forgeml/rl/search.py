"""Hyperparameter search of a reinforcement experiment, with the same ``tune:`` section
as supervised searches.

Each trial is an RLlib algorithm, run by Tune as a class trainable as ``forgeml train``
runs one, built from the base config with the trial's values at their forgeml paths
(``task.algorithm.lr``, ``model.hidden``...): ``forgeml.rl.algorithm`` stays the one
place where forgeml's settings meet RLlib's names. A trial's score is the mean return of
its latest training episodes; ASHA stops poor trials between iterations. Tune keeps the
search's state for ``--resume``; the best trial's best checkpoint is scored on held-out
episodes and registered as a training run's policy is.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd
from ray import tune
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

from forgeml.config import ExperimentConfig, TuneConfig
from forgeml.rl.algorithm import algorithm_config
from forgeml.rl.train import (
    RETURN,
    IterationTracking,
    _history,
    checkpointing,
    register_policy,
    start_run,
    stop_conditions,
    tracked_run,
)
from forgeml.storage import Storage
from forgeml.tracking import run_tracking
from forgeml.tune.search import (
    BEST_CONFIG_FILE,
    TrialProgress,
    TuningOutcome,
    fit_search,
    search_name,
    search_tuner,
    searched_trials,
    trial_config,
    write_results,
)

logger = logging.getLogger("forgeml.rl")


def searched_algorithm(base: dict) -> type:
    """The class Tune runs every trial as: RLlib's class of the base config's algorithm,
    whose config, and so its resource request, it builds from a trial's values."""
    algo_class = algorithm_config(trial_config(base, {})).algo_class
    space = base["tune"]["space"]

    def built(config: dict) -> AlgorithmConfig:
        """Tune adds its own entries (``__trial_info__``...) to a trial's config."""
        return algorithm_config(trial_config(base, {k: config[k] for k in space if k in config}))

    class SearchedAlgorithm(algo_class):
        @classmethod
        def default_resource_request(cls, config):
            return algo_class.default_resource_request(built(config))

        def __init__(self, config=None, **kwargs):
            super().__init__(config=built(config or {}), **kwargs)

        def step(self) -> dict:
            return with_return(super().step())

    SearchedAlgorithm.__name__ = algo_class.__name__  # trials are named after it
    return SearchedAlgorithm


def with_return(result: dict) -> dict:
    """``result`` with a mean return, NaN if no episode ended in the iteration (RLlib then
    reports none): a search's scheduler and searcher read it from every result, and Tune
    fails a trial whose result lacks it."""
    group, name = RETURN.split("/")
    result.setdefault(group, {}).setdefault(name, math.nan)
    return result


class TrialTracking(IterationTracking):
    """A search's trials, each logged from its own folder into an MLflow run named after
    it and tagged with the search, as a supervised search's trials (MLflow only: Tune's
    own logger already writes TensorBoard files in every trial's folder)."""

    def __init__(self, cfg: ExperimentConfig, storage: Storage, base: dict, search: str):
        super().__init__(cfg, storage, storage.path("tune", search), search)
        self.base = base

    def logged_as(self, trial) -> tuple[ExperimentConfig, str, dict]:
        space = self.base["tune"]["space"]
        cfg = trial_config(self.base, {key: trial.config[key] for key in space})
        storage = Storage(cfg.storage)
        settings = run_tracking(
            self.store | {"tensorboard": False},
            cfg,
            storage,
            trial.path,
            trial.trial_id,
            **{"forgeml.tune_experiment": self.name},
        )
        return cfg, trial.path, settings


def _trial_state(
    result: tune.Result, history: list[dict], trial: ExperimentConfig, scheduled: bool
) -> str:
    """How a trial ended: error, reached_target, completed (its iteration or step
    limit), pruned (stopped by ASHA) or stopped (by the time budget)."""
    if result.error is not None:
        return "error"
    if not history:
        return "stopped"
    last, task = history[-1], trial.task
    if task.target_return is not None and (last["episode_return_mean"] or -math.inf) >= (
        task.target_return
    ):
        return "reached_target"
    if last["epoch"] >= task.max_iterations or (
        task.max_env_steps is not None and last["env_steps"] >= task.max_env_steps
    ):
        return "completed"
    return "pruned" if scheduled else "stopped"


def _trial_rows(results, settings: TuneConfig, base: dict, trials: dict) -> pd.DataFrame:
    """One row per trial: its values, best mean return, iterations, seconds, CPU-seconds
    (its env runners' and its learner's) and state."""
    rows = []
    for result in results:
        history = _history(result) if result.metrics_dataframe is not None else []
        trial_id, sampled = trials[Path(result.path).name]
        params = {path: sampled[path] for path in settings.space}
        trial = trial_config(base, params)
        returns = [r["episode_return_mean"] for r in history]
        returns = [value for value in returns if value is not None]
        seconds = history[-1]["time_s"] if history else 0.0
        cpus = trial.scaling.num_workers * trial.scaling.cpus_per_worker + 1
        rows.append(
            {
                "trial_id": trial_id,
                **{f"param.{path}": value for path, value in params.items()},
                settings.metric: float(max(returns)) if returns else math.nan,
                "iterations": history[-1]["epoch"] if history else 0,
                "seconds": round(seconds, 2),
                "cpu_seconds": round(seconds * cpus, 2),
                "state": _trial_state(
                    result, history, trial, scheduled=settings.scheduler.kind != "none"
                ),
                "path": result.path,
            }
        )
    return pd.DataFrame(rows)


def run_reinforcement_search(cfg: ExperimentConfig, resume: bool | str = False) -> TuningOutcome:
    """Search ``cfg.tune.space``, write the results, and register the best trial's policy
    (StorageFailure as ``run_tuning`` raises it)."""
    started = time.monotonic()
    storage = Storage(cfg.storage)
    name = search_name(storage, cfg, resume)
    with storage.failures_named(name):
        return _search(cfg, storage, name, resume, started)


def _search(
    cfg: ExperimentConfig, storage: Storage, name: str, resume: bool | str, started: float
) -> TuningOutcome:
    """``run_reinforcement_search`` once the search is named."""
    settings = cfg.tune
    path = storage.path("tune", name)
    start_run(cfg, storage, path)
    base = cfg.resolved()
    tuner = search_tuner(
        cfg,
        searched_algorithm(base),
        storage,
        name,
        resume,
        metric=RETURN,
        max_t=cfg.task.max_iterations,
        time_attr="training_iteration",
        reuse_actors=False,
        progress=TrialProgress(settings.metric, RETURN, "training_iteration"),
        # A trial has nothing of forgeml's to log without MLflow.
        callbacks=[TrialTracking(cfg, storage, base, name)]
        if cfg.tracking.mlflow is not None
        else [],
        stop=stop_conditions(cfg),
        checkpoint_config=checkpointing(cfg),
    )
    logger.info("searching %s as %s (%s)", cfg.name, name, storage.uri("tune", name))
    results = fit_search(tuner, storage)
    searched = searched_trials(results, storage)
    trials = _trial_rows(results, settings, base, searched)
    write_results(storage, path, trials)
    scored = trials.dropna(subset=[settings.metric])
    if scored.empty:
        raise RuntimeError(
            f"no trial of search {name} ended a training episode; see {storage.uri('tune', name)}"
        )
    best_row = scored.loc[scored[settings.metric].idxmax()]  # a policy search maximises
    best = next(result for result in results if result.path == best_row["path"])
    best_params = {key: searched[Path(best.path).name][1][key] for key in settings.space}
    best_config = trial_config(base, best_params)
    storage.write_text(f"{path}/{BEST_CONFIG_FILE}", best_config.to_yaml())
    run = {
        "name": name,
        "uri": storage.uri("tune", name),
        "trial": best.path,
        "env_runners": best_config.scaling.num_workers,
        "use_gpu": best_config.scaling.use_gpu,
    }
    ended = {"pruned": "pruned by asha", "stopped": "stopped by tune.time_budget_s"}
    version, metrics = register_policy(
        best_config,
        storage,
        best,
        run,
        started,
        tracked=tracked_run(storage, best.path),
        status=ended.get(best_row["state"]),
    )
    return TuningOutcome.of(
        name,
        storage.uri("tune", name),
        trials,
        settings,
        (best_params, best_config),
        version,
        metrics,
        started,
    )
