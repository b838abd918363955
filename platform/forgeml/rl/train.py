"""From a reinforcement experiment to a registered policy: RLlib's algorithm runs as a
Ray Tune trial (Tune checkpoints it, stops it, retries it after a failure and restores
it for ``--resume``), then the best kept checkpoint's policy is scored on held-out
episodes beside a random policy and registered."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone

from ray import tune
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.tune.utils import flatten_dict

from forgeml import console, runtime
from forgeml.baselines import compare, warning_text
from forgeml.config import ExperimentConfig
from forgeml.launch import resolve_run_name
from forgeml.rl.algorithm import algorithm_config, register_environment
from forgeml.rl.evaluate import EVALUATION_SEED_OFFSET, random_actor, run_episodes
from forgeml.rl.package import policy_package
from forgeml.rl.policy import Policy, supported_spaces
from forgeml.storage import ModelRegistry, ModelVersion, Storage
from forgeml.tracking import EpochLogger, log_registration, open_tracking, run_tracking

logger = logging.getLogger("forgeml.rl")

#: RLlib's result keys, as Tune reads them (nested keys joined by "/").
RETURN = "env_runners/episode_return_mean"
EPISODE_LENGTH = "env_runners/episode_len_mean"
ENV_STEPS = "num_env_steps_sampled_lifetime"
#: Where an algorithm checkpoint keeps its policy.
MODULE_PATH = "learner_group/learner/rl_module/default_policy"


class IterationLine(tune.Callback):
    """The console's line for every training iteration: env steps, the mean return and
    length of the latest episodes, time and ETA (by whichever limit comes first)."""

    def __init__(self, cfg: ExperimentConfig):
        self.task = cfg.task
        self.started = time.monotonic()

    def setup(self, **info) -> None:
        """Elapsed counts from this driver's start: a resumed run's callback is the one
        pickled with the experiment, whose clock may be another machine's."""
        self.started = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        result = flatten_dict(result, delimiter="/")
        done, steps = result["training_iteration"], result.get(ENV_STEPS, 0)
        elapsed = time.monotonic() - self.started
        per_iteration = result["time_total_s"] / done  # training only, not start-up
        eta = per_iteration * (self.task.max_iterations - done)
        if self.task.max_env_steps and steps:
            eta = min(eta, per_iteration * done / steps * (self.task.max_env_steps - steps))
        logger.info(
            "iteration %d/%d  env steps %d  return %.2f  episode length %.1f  elapsed %s  eta %s",
            done,
            self.task.max_iterations,
            steps,
            result.get(RETURN, math.nan),
            result.get(EPISODE_LENGTH, math.nan),
            console.format_seconds(elapsed),
            console.format_seconds(max(eta, 0)),
        )


def check_environment(cfg: ExperimentConfig) -> None:
    """The environment builds, and its spaces fit RLlib's default networks and the
    algorithm, before any Ray worker starts."""
    env = cfg.env.make()
    problem = supported_spaces(env.observation_space, env.action_space)
    env.close()
    if problem:
        raise ValueError(f"env: {cfg.env.name}: {problem}")
    if cfg.task.algorithm.name == "dqn" and not hasattr(env.action_space, "n"):
        raise ValueError(
            f"task.algorithm: dqn needs discrete actions; {cfg.env.name} has "
            f"{env.action_space}; use ppo"
        )


#: An iteration's record (a package's history has one per iteration, as one per epoch
#: for other tasks) from Tune's flattened result: its names to Tune's keys.
ITERATION_RECORD = {
    "epoch": "training_iteration",
    "env_steps": ENV_STEPS,
    "episode_return_mean": RETURN,
    "episode_length_mean": EPISODE_LENGTH,
    "time_s": "time_total_s",
}


def iteration_record(result: dict) -> dict:
    """The record of one iteration's flattened result; None where RLlib had no value."""
    return {name: _number(result.get(key)) for name, key in ITERATION_RECORD.items()}


def _history(result: tune.Result) -> list[dict]:
    """One record per iteration; of an iteration done twice (before and after a resume),
    the later."""
    records = {}
    for row in result.metrics_dataframe.to_dict("records"):  # redone iterations come again
        record = iteration_record(row)
        records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


#: In a reinforcement run's folder: where it logs (its MLflow run's id), so that the run
#: restored after a failure or by ``--resume`` logs on into the same MLflow run.
TRACKING_FILE = "tracking.json"


class IterationTracking(tune.Callback):
    """Each trial's iterations as TensorBoard scalars in ``<folder>/tensorboard`` and, with
    ``tracking.mlflow``, MLflow metrics (step = iteration), as a training run's epochs,
    logged from the driver. A training run has one trial, logged in the run's folder.
    After a restore TensorBoard drops what was logged past the iteration the trial goes
    on from; a trial stopped before its limits (by a search's scheduler) ends KILLED in
    MLflow, as a supervised search's."""

    def __init__(self, cfg: ExperimentConfig, storage: Storage, folder: str, name: str):
        self.cfg, self.folder, self.name = cfg, folder, name
        self.store = open_tracking(cfg, storage)
        self.loggers: dict[str, EpochLogger] = {}
        self.logged: dict[str, int] = {}

    def logged_as(self, trial) -> tuple[ExperimentConfig, str, dict]:
        """The config, folder and tracking settings of ``trial``'s log."""
        storage = Storage(self.cfg.storage)
        return (
            self.cfg,
            self.folder,
            run_tracking(self.store, self.cfg, storage, self.folder, self.name),
        )

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        record = iteration_record(flatten_dict(result, delimiter="/"))
        restored = record["epoch"] <= self.logged.get(trial.trial_id, 0)
        if restored and trial.trial_id in self.loggers:
            self.loggers.pop(trial.trial_id).close_tensorboard()
        if trial.trial_id not in self.loggers:
            cfg, folder, settings = self.logged_as(trial)
            storage = Storage(cfg.storage)
            resumed = tracked_run(storage, folder)
            epoch_logger = EpochLogger(settings, cfg, resumed, record["epoch"])
            storage.write_text(f"{folder}/{TRACKING_FILE}", json.dumps(epoch_logger.state))
            self.loggers[trial.trial_id] = epoch_logger
        self.loggers[trial.trial_id].log_epoch(record)
        self.logged[trial.trial_id] = record["epoch"]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        """A trial stopped by its limits (Tune's stop criteria) completed; one that a
        scheduler stopped, killed (Tune marks both results done)."""
        last = flatten_dict(trial.last_result or {}, delimiter="/")
        limits = trial.stopping_criterion.items()
        reached = any(key in last and last[key] >= limit for key, limit in limits)
        self._close(trial, "completed" if reached else "killed")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "failed")

    def on_experiment_end(self, trials, **info) -> None:
        """Trials still open when the experiment ends (stopped by its time budget)."""
        for trial in trials:
            self._close(trial, "killed")

    def _close(self, trial, status: str) -> None:
        epoch_logger = self.loggers.pop(trial.trial_id, None)
        if epoch_logger is not None:
            epoch_logger.close(status)

    def __getstate__(self):
        return {**self.__dict__, "loggers": {}}


def tracked_run(storage: Storage, folder: str) -> dict | None:
    """Where the run in ``folder`` logs, once it has logged an iteration."""
    path = f"{folder}/{TRACKING_FILE}"
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def _number(value) -> float | int | None:
    """A JSON number, or None where RLlib had none (no episode ended yet)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def scored_metrics(result: tune.Result) -> list[tuple]:
    """The kept checkpoints whose iteration had a mean return (an episode had ended)."""
    flat = [(c, flatten_dict(metrics, delimiter="/")) for c, metrics in result.best_checkpoints]
    scored = [(c, metrics) for c, metrics in flat if math.isfinite(metrics.get(RETURN, math.nan))]
    if not scored:
        raise RuntimeError(
            f"no training episode ended in {result.metrics['training_iteration']} "
            "iterations; raise task.max_iterations"
        )
    return scored


def stop_reason(cfg: ExperimentConfig, last: dict) -> str:
    """Which limit ended a run whose last iteration is ``last`` (a history record)."""
    task = cfg.task
    target = task.target_return
    if target is not None and (last["episode_return_mean"] or -math.inf) >= target:
        return "reached target_return"
    if task.max_env_steps is not None and last["env_steps"] >= task.max_env_steps:
        return "reached max_env_steps"
    return "reached max_iterations"


def start_run(cfg: ExperimentConfig, storage: Storage, path: str) -> None:
    """Before a run or search at ``path``: the environment checked, Ray joined or
    started, the run's log kept there, and the environment registered with Ray."""
    check_environment(cfg)
    runtime.connect()
    runtime.require_shared_storage(cfg.storage)
    console.keep_run_log(storage, path)
    register_environment(cfg)


def stop_conditions(cfg: ExperimentConfig) -> dict:
    """Tune's stop criteria of a run: max_iterations, and max_env_steps and target_return
    where set."""
    task = cfg.task
    stop = {"training_iteration": task.max_iterations}
    if task.max_env_steps is not None:
        stop[ENV_STEPS] = task.max_env_steps
    if task.target_return is not None:
        stop[RETURN] = task.target_return
    return stop


def checkpointing(cfg: ExperimentConfig) -> tune.CheckpointConfig:
    """Every ``task.checkpoint_every`` iterations and at the end; the ``keep_top_k`` with
    the best mean return are kept."""
    return tune.CheckpointConfig(
        checkpoint_frequency=cfg.task.checkpoint_every,
        checkpoint_at_end=True,
        num_to_keep=cfg.train.checkpoint.keep_top_k,
        checkpoint_score_attribute=RETURN,
        checkpoint_score_order="max",
    )


def register_policy(
    cfg: ExperimentConfig,
    storage: Storage,
    result: tune.Result,
    run: dict,
    started: float,
    tracked: dict | None = None,
    status: str | None = None,
) -> tuple[ModelVersion, dict]:
    """Score the best kept checkpoint's policy of ``result`` (a trial of ``cfg``) on
    held-out episodes beside a random policy, and register it; ``run`` says where it was
    trained, ``tracked`` where it logged (the package is added there), ``status`` how it
    ended if not by one of its limits (a search's trial pruned or stopped). Returns the
    version and its metrics."""
    history = _history(result)
    best, best_metrics = max(scored_metrics(result), key=lambda pair: pair[1][RETURN])
    with best.as_directory() as folder:
        module = RLModule.from_checkpoint(f"{folder}/{MODULE_PATH}")
    policy = Policy(cfg, module, module.observation_space, module.action_space)
    module.eval()
    seed = cfg.seed + EVALUATION_SEED_OFFSET
    episodes = cfg.task.evaluation_episodes
    evaluation = run_episodes(lambda obs: policy.act(obs)["actions"], cfg.env, episodes, seed)
    random_scores = run_episodes(random_actor(cfg.env, seed), cfg.env, episodes, seed)
    baseline = {
        "model": "a random policy",
        "test": random_scores,
        "compared": compare(evaluation, random_scores, (("return_mean", "max"),)),
    }
    baseline["warning"] = warning_text(baseline)
    metrics = {
        "test": evaluation,
        "baseline": baseline,
        "best_epoch": best_metrics["training_iteration"],
        "selected_by": {"metric": "episode_return_mean", "mode": "max"},
        "status": status or stop_reason(cfg, history[-1]),
        "history": history,
        "environment": cfg.env.name,
        "run": {**run, "wall_s": round(time.monotonic() - started, 1)},
        "registered_at": f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
    }
    package = policy_package(cfg, policy, metrics)
    version = ModelRegistry(storage).register(cfg.name, package)
    log_registration(cfg, tracked, version.ref, metrics, package)
    return version, metrics


def run_reinforcement(cfg: ExperimentConfig, resume: bool | str = False):
    """Train, evaluate and register a policy; returns the same outcome as supervised
    training (``forgeml.train.trainer.TrainingOutcome``), and raises StorageFailure,
    naming the run, as it does."""
    started = time.monotonic()
    storage = Storage(cfg.storage)
    name = resolve_run_name(storage, "runs", cfg.name, resume)
    with storage.failures_named(name):
        return _train(cfg, storage, name, resume, started)


def _train(cfg: ExperimentConfig, storage: Storage, name: str, resume: bool | str, started: float):
    """``run_reinforcement`` once the run is named."""
    from forgeml.train.trainer import TrainingOutcome

    path = storage.path("runs", name)
    start_run(cfg, storage, path)
    config = algorithm_config(cfg)
    trainable = config.algo_class
    runtime.keep_credentials_out_of_trial_envs()
    if resume is not False and tune.Tuner.can_restore(storage.uri("runs", name)):
        tuner = tune.Tuner.restore(
            storage.uri("runs", name),
            trainable=trainable,
            param_space=config,
            resume_errored=True,
            storage_filesystem=None if storage.is_local else storage.fs,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage.path("runs"),
                storage_filesystem=None if storage.is_local else storage.fs,
                stop=stop_conditions(cfg),
                checkpoint_config=checkpointing(cfg),
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
                callbacks=[IterationLine(cfg), IterationTracking(cfg, storage, path, name)],
                verbose=None if console.verbose_from_environment() else 0,
            ),
        )
    logger.info("training %s as run %s (%s)", cfg.name, name, storage.uri("runs", name))
    result = tuner.fit()[0]
    if result.error is not None:
        raise result.error
    run = {
        "name": name,
        "uri": storage.uri("runs", name),
        "env_runners": cfg.scaling.num_workers,
        "use_gpu": cfg.scaling.use_gpu,
    }
    tracked = tracked_run(storage, path)
    version, metrics = register_policy(cfg, storage, result, run, started, tracked)
    return TrainingOutcome(
        run_name=name,
        status=metrics["status"],
        epochs=len(metrics["history"]),
        version=version,
        metrics=metrics,
    )
