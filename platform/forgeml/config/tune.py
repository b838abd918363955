"""The ``tune`` section: a Ray Tune search over a config's fields."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from forgeml.config.base import Section
from forgeml.config.tasks import VALIDATION_METRICS

#: Metrics every epoch reports (train/loop.py), so the only ones Tune can select on.
#: Metrics every epoch reports (train/loop.py), so the only ones Tune can select on.
ReportedMetric = Literal[(*VALIDATION_METRICS, "train_loss")]


class RangeParam(Section):
    """A distribution between two bounds; subclasses give the bounds their type."""

    @model_validator(mode="after")
    def _ordered(self) -> RangeParam:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class UniformParam(RangeParam):
    kind: Literal["uniform"] = Field("uniform", description="Selects this variant.")
    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")


class LogUniformParam(UniformParam):
    kind: Literal["loguniform"] = Field("loguniform", description="Selects this variant.")
    low: float = Field(gt=0, description="Smallest value (> 0).")


class IntParam(RangeParam):
    kind: Literal["int"] = Field("int", description="Selects this variant.")
    low: int = Field(description="Smallest value.")
    high: int = Field(description="Largest value (inclusive).")


class ChoiceParam(Section):
    kind: Literal["choice"] = Field("choice", description="Selects this variant.")
    values: list[Any] = Field(min_length=1, description="Candidate values.")


class GridParam(ChoiceParam):
    """Every value is tried (with every value of the other grid parameters)."""

    kind: Literal["grid"] = Field("grid", description="Selects this variant.")


SearchParam = Annotated[
    UniformParam | LogUniformParam | IntParam | ChoiceParam | GridParam,
    Field(discriminator="kind"),
]


class SearchConfig(Section):
    kind: Literal["optuna_tpe", "optuna_gp", "random", "grid"] = Field(
        "optuna_tpe",
        description="optuna_tpe / optuna_gp: Bayesian (Optuna's TPE or Gaussian-process "
        "sampler); random: independent samples; grid: only grid parameters, all combinations.",
    )
    seed: int | None = Field(None, description="Searcher seed; null: the experiment's seed.")


#: Values a trial can change in the middle of training and keep its checkpoint: what
#: Population Based Training perturbs. Other searched paths are drawn once per trial and
#: travel with the checkpoint a trial copies.
PBT_MUTABLE = (
    "train.optimizer.lr",
    "train.optimizer.weight_decay",
    "train.optimizer.momentum",
    "model.dropout",
    "train.grad_clip_norm",
)


class SchedulerConfig(Section):
    kind: Literal["asha", "pbt", "none"] = Field(
        "asha",
        description="asha: stop poor trials early at rungs; pbt: Population Based Training, "
        "every perturbation_interval epochs the worst trials continue from a best trial's "
        "checkpoint with its values of " + ", ".join(PBT_MUTABLE) + " perturbed (learning "
        "rates become schedules); none: run every trial out.",
    )
    grace_period: int = Field(2, ge=1, description="asha: epochs every trial runs before pruning.")
    reduction_factor: float = Field(
        3, gt=1, description="asha: keeps 1/reduction_factor of the trials per rung."
    )
    perturbation_interval: int = Field(
        2, ge=1, description="pbt: epochs between exploit/explore steps."
    )
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="pbt: share of trials that copy and that are copied."
    )
    resample_probability: float = Field(
        0.25,
        ge=0,
        le=1,
        description="pbt: chance a perturbed value is drawn afresh from its distribution "
        "instead of scaled by 0.8 or 1.2 (or shifted to a neighbouring choice).",
    )
    synchronous: bool = Field(
        False,
        description="pbt: trials wait for each other at every perturbation point, so the "
        "worst are always judged against trials of the same epoch (as in the PBT paper); "
        "off, each trial is judged against whichever others are running then, and a trial "
        "that runs alone is never perturbed.",
    )


class TuneConfig(Section):
    """Hyperparameter search over any config field; each trial is one Ray Train run (an
    RLlib algorithm for task reinforcement)."""

    metric: ReportedMetric = Field(
        "val_loss",
        description="Per-epoch metric the search optimises; a reinforcement search's is "
        "episode_return_mean, maximised.",
    )
    mode: Literal["min", "max"] = Field("min", description="Whether smaller or larger is better.")
    space: dict[str, SearchParam] = Field(
        min_length=1,
        description="Dotted config path (e.g. train.optimizer.lr) to its distribution.",
    )
    num_trials: int = Field(
        16,
        ge=1,
        description="Trials to run. Grid parameters multiply: each trial runs the whole "
        "grid; search kind grid runs it once and ignores this.",
    )
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once.")
    trial_mode: Literal["train", "in_process"] = Field(
        "train",
        description="train: each trial is a Ray Train run with scaling.num_workers workers "
        "(DDP, restarts on worker failure); in_process: each trial trains inside its own Tune "
        "process on one worker's resources (scaling.cpus_per_worker, a GPU with use_gpu), "
        "without a Train controller's start-up: for small models, and needed by pbt.",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop starting and running trials after this many seconds."
    )
    search: SearchConfig = Field(default_factory=SearchConfig, description="The searcher.")
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="Early stopping of poor trials."
    )

    @property
    def planned_trials(self) -> int:
        """Trials the search runs unless its time budget ends it: every combination of
        the grid parameters, once for search kind grid, else once per sample."""
        grid = math.prod(len(param.values) for param in self.space.values() if param.kind == "grid")
        return grid if self.search.kind == "grid" else grid * self.num_trials

    @model_validator(mode="after")
    def _space_fits_searcher(self) -> TuneConfig:
        grid = [path for path, param in self.space.items() if param.kind == "grid"]
        if self.search.kind == "grid" and len(grid) != len(self.space):
            others = sorted(set(self.space) - set(grid))
            raise ValueError(f"search kind grid needs grid parameters only; not grid: {others}")
        if grid and self.search.kind.startswith("optuna"):
            raise ValueError(f"{self.search.kind} cannot search grid parameters {grid}")
        return self

    def check_pbt(self) -> None:
        """PBT copies checkpoints between trials, which only Tune-reported checkpoints
        allow: Ray Train V2's TuneReportCallback passes Tune metrics but no checkpoint.
        Checked by the experiment, which knows whether its trials can be PBT's."""
        if self.trial_mode != "in_process":
            raise ValueError(
                "tune.scheduler: pbt needs trial_mode in_process: a Ray Train trial hands Tune "
                "no checkpoint that another trial could continue from"
            )
        if self.search.kind not in ("random", "grid"):
            raise ValueError(
                f"tune.scheduler: pbt draws its own population; set search.kind to random or grid "
                f"(got {self.search.kind})"
            )
        if not set(self.space) & set(PBT_MUTABLE):
            raise ValueError(
                f"tune.scheduler: pbt needs at least one of {', '.join(PBT_MUTABLE)} in the space "
                "to perturb"
            )
