"""The whole experiment, and the checks that span its sections: task, data and model fit
together as each one's registry entry says (``TaskSection``, ``ModelSection``, the data's
``kind``), never by a table kept beside them."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, model_validator

from forgeml.config.base import Section, variants
from forgeml.config.data import DataConfig, Features, Source
from forgeml.config.environment import EnvConfig
from forgeml.config.models import CNNConfig, ModelConfig
from forgeml.config.monitor import MonitorConfig
from forgeml.config.serve import ServeConfig
from forgeml.config.storage import StorageConfig
from forgeml.config.tasks import ClassificationTask, TaskConfig
from forgeml.config.tracking import TrackingConfig
from forgeml.config.train import EarlyStoppingConfig, ScalingConfig, TrainConfig
from forgeml.config.tune import TuneConfig


def models_for(task: str, data: str) -> list[str]:
    """The models that fit a task on a kind of data, in the registry's order."""
    own = variants(TaskConfig)[task].own_models
    made_for = (task,) if own else (None, task)
    return [
        kind
        for kind, model in variants(ModelConfig).items()
        if data in model.reads and model.made_for in made_for
    ]


def default_model(source: str, features: str | None, task: str) -> str | None:
    """The model of a config that names none: the one made for a task that takes only
    its own, else the usual first model for the data; None where the parts are unknown."""
    task_section = variants(TaskConfig).get(task)
    if task_section is not None and task_section.own_models:
        return next(k for k, m in variants(ModelConfig).items() if m.made_for == task)
    data = variants(Features).get(features) if features else variants(Source).get(source)
    return data.default_model if data is not None else None


def _default_models() -> dict[str, str]:
    """Each kind of data, and each task whose model differs from its data's, to its
    default model."""
    data = {s.holds: s.default_model for s in variants(Source).values() if s.holds}
    data |= {kind: f.default_model for kind, f in variants(Features).items()}
    tasks = {kind: default_model("table", None, kind) for kind in variants(TaskConfig)}
    tasks = {
        kind: model
        for kind, model in tasks.items()
        if model and any(data.get(d) != model for d in variants(TaskConfig)[kind].data)
    }
    return tasks | data


#: What a config that names no model gets, by task or kind of data (for the docs).
DEFAULT_MODELS = _default_models()


def _data_text(kinds: tuple[str, ...] | list[str]) -> str:
    """Kinds of data as a config says them: an image source, data.features of kind X."""
    features = [kind for kind in kinds if kind != "images"]
    said = ["an image source"] if "images" in kinds else []
    if features:
        said.append(f"data.features of kind {' or '.join(features)}")
    return " or ".join(said)


#: The only train and scaling settings a task that acts in an environment takes.
ACTING_TRAIN_FIELDS = frozenset({"max_failures", "checkpoint"})
ACTING_SCALING_FIELDS = frozenset({"num_workers", "cpus_per_worker", "use_gpu"})


class ExperimentConfig(Section):
    """One experiment: the model it registers, and everything needed to reproduce it."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="Registered model name (lowercase, digits, '.', '_', '-').",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seeds data generation, split, initialisation, augmentation and the "
        "order rows are trained in: a cached run on one worker repeats exactly.",
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Where datasets, runs and models live."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Source and preprocessing.")
    env: EnvConfig | None = Field(
        None, description="The environment a reinforcement task learns in, instead of data."
    )
    model: ModelConfig = Field(
        default_factory=CNNConfig,
        description="Model family. Omitted: the usual first model for the task or the data ("
        + ", ".join(f"{kind}: {model}" for kind, model in DEFAULT_MODELS.items())
        + ").",
    )
    task: TaskConfig = Field(default_factory=ClassificationTask, description="What is predicted.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    scaling: ScalingConfig = Field(
        default_factory=ScalingConfig, description="Ray Train workers and their resources."
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Ray Serve deployment.")
    tune: TuneConfig | None = Field(
        None, description="Hyperparameter search (forgeml tune); training ignores it."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Where runs log params, per-epoch metrics and artifacts.",
    )
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig, description="Drift monitoring of the served model."
    )

    @model_validator(mode="before")
    @classmethod
    def _model_for_the_data(cls, raw: Any) -> Any:
        """A model section that names no kind (or none at all) gets the default model
        for the data and task; its other fields apply to that model."""
        if not isinstance(raw, dict):
            return raw
        model = raw.get("model") or {}
        if not isinstance(model, dict) or "kind" in model:
            return raw
        data, task = raw.get("data"), raw.get("task")
        source = data.get("source") if isinstance(data, dict) else None
        features = data.get("features") if isinstance(data, dict) else None
        kind = default_model(
            source.get("kind", "wafer") if isinstance(source, dict) else "wafer",
            features.get("kind") if isinstance(features, dict) else None,
            task.get("kind", "classification") if isinstance(task, dict) else "classification",
        )
        return {**raw, "model": {"kind": kind, **model}} if kind else raw

    @model_validator(mode="after")
    def _parts_fit_together(self) -> ExperimentConfig:
        """Task, data and model fit together as each states what it can do; then the
        checks that belong to one pairing."""
        task, data, model = self.task, self.data, self.model
        if task.acts:
            return self._check_reinforcement()
        if self.env is not None:
            raise ValueError(
                f"env: only task reinforcement learns in an environment (task is {task.kind})"
            )
        if data.kind not in task.data:
            takers = [kind for kind, t in variants(TaskConfig).items() if data.kind in t.data]
            raise ValueError(
                f"task: {task.kind} needs {_data_text(task.data)} (got {_data_text([data.kind])}, "
                f"which task {' or '.join(takers)} learns from)"
            )
        if model.made_for not in (None, task.kind):
            raise ValueError(
                f"model: {model.kind} is made for task {model.made_for}; task "
                f"{task.kind} needs another model"
            )
        fitting = models_for(task.kind, data.kind)
        if model.kind not in fitting:
            raise ValueError(
                f"model: task {task.kind} on {_data_text([data.kind])} needs model "
                f"{' or '.join(fitting)} (got {model.kind})"
            )
        if task.draws_images:
            self._check_image_generation()
        if getattr(model, "autoregressive", False) and data.kind != "series":
            raise ValueError(
                "model.autoregressive: a linear autoregression adds to a forecast; it needs "
                f"data.features of kind series (got {data.kind})"
            )
        if getattr(model, "autoregressive", False) is None:
            model.autoregressive = data.kind == "series"
        pretrained = self.train.freeze is not None and self.train.freeze.params == "pretrained"
        for path, needs in (
            ("train.freeze.params", pretrained),
            ("train.optimizer.pretrained_lr_scale", self.train.optimizer.pretrained_lr_scale < 1),
        ):
            if needs and model.init_from is None:
                raise ValueError(
                    f"{path}: the pretrained parameters are those model.init_from loads; "
                    "set model.init_from, or name parameters by pattern"
                )
        if data.split.stratify and not task.has_classes:
            raise ValueError(
                f"data.split.stratify: stratifying balances classes, and task "
                f"{task.kind} has none; remove it"
            )
        if self.train.early_stopping.metric == "epoch" and self.train.schedule.kind == "plateau":
            raise ValueError(
                "train.schedule: plateau lowers the rate when the watched metric stalls, and "
                "early_stopping.metric epoch never stalls; choose another schedule"
            )
        if self.tune is not None and self.tune.scheduler.kind == "pbt":
            self.tune.check_pbt()
        allowed = ("val_loss", "train_loss", *task.metrics)
        watched = [("train.early_stopping.metric", self.train.early_stopping.metric, "epoch")]
        if self.tune is not None:
            watched.append(("tune.metric", self.tune.metric, None))
        for path, metric, also in watched:
            if metric not in (*allowed, also):
                raise ValueError(
                    f"{path}: {task.kind} does not report {metric}; choose one of "
                    f"{', '.join(allowed)}"
                )
        return self

    def _check_reinforcement(self) -> ExperimentConfig:
        """An environment and no data; the settings of ``train`` and ``scaling`` that a
        run of RLlib has no use for are refused, not ignored."""
        if self.env is None:
            raise ValueError(
                f"env: task {self.task.kind} learns in an environment; add env: {{id: "
                "CartPole-v1} or env: {entry_point: module:Factory}"
            )
        if "data" in self.model_fields_set:
            raise ValueError(
                "data: a reinforcement task learns in its env, not from a dataset; remove data"
            )
        if self.model.init_from is not None:
            raise ValueError("model.init_from: a policy starts from random weights")
        if self.model.made_for != self.task.kind:
            fitting = models_for(self.task.kind, "environment")
            raise ValueError(f"model: task {self.task.kind} needs model {' or '.join(fitting)}")
        if unused := sorted(self.train.model_fields_set - ACTING_TRAIN_FIELDS):
            raise ValueError(
                f"train.{unused[0]}: a reinforcement run takes its training settings from task "
                "(algorithm, max_iterations, target_return); only train.max_failures and "
                "train.checkpoint apply"
            )
        if isinstance(self.scaling.num_workers, tuple):
            raise ValueError(
                "scaling.num_workers: a reinforcement run has a fixed number of env runners"
            )
        if unused := sorted(self.scaling.model_fields_set - ACTING_SCALING_FIELDS):
            raise ValueError(
                f"scaling.{unused[0]}: a reinforcement run sets only its env runners "
                "(num_workers, cpus_per_worker) and the learner's use_gpu"
            )
        if self.tune is not None:
            self._check_reinforcement_search()
        return self

    def _check_reinforcement_search(self) -> None:
        """A search of a policy maximises its return; its trials are RLlib algorithms,
        not Ray Train runs or in-process trials, and PBT is not for them."""
        tune = self.tune
        if "metric" not in tune.model_fields_set:
            tune.metric = self.task.metrics[0]
        if tune.metric not in self.task.metrics:
            raise ValueError(
                f"tune.metric: {self.task.kind} reports {', '.join(self.task.metrics)} "
                f"(got {tune.metric})"
            )
        if "mode" not in tune.model_fields_set:
            tune.mode = "max"
        elif tune.mode != "max":
            raise ValueError(
                f"tune.mode: a reinforcement search maximises the return (got {tune.mode})"
            )
        if tune.scheduler.kind == "pbt":
            raise ValueError(
                "tune.scheduler.kind: pbt is for the in_process trials of other tasks; a "
                "reinforcement search uses asha or none"
            )
        if "trial_mode" in tune.model_fields_set:
            raise ValueError(
                "tune.trial_mode: a reinforcement search runs every trial as an RLlib "
                "algorithm with its own env runners (scheduler asha or none); remove it"
            )

    def _check_image_generation(self) -> None:
        """Single-channel codes, augmented only by turns and flips; the image side a
        model's levels halve; a GAN's training defaults."""
        if getattr(self.data.source, "channels", 1) != 1:
            raise ValueError(
                f"data.source.channels: task {self.task.kind} draws single-channel images, "
                "each value a category; set channels: 1"
            )
        augment = self.data.augment
        for name, value in (
            ("crop_scale", augment.crop_scale),
            ("color_jitter", augment.color_jitter),
        ):
            if value:
                raise ValueError(
                    f"data.augment.{name}: task {self.task.kind} reads image values as "
                    "categories, which resizing and jitter would blend; use rotate90 or flip"
                )
        side = getattr(self.data.source, "image_size", None)
        if side is not None and side % 2**self.model.depth:
            raise ValueError(
                f"model: depth {self.model.depth} halves the {side}x{side} image "
                f"{self.model.depth} times, so data.source.image_size must divide by "
                f"{2**self.model.depth}"
            )
        if self.task.kind != "gan":
            return
        train = self.train
        # A GAN's losses do not say how good its images are: keep the last epoch.
        if "metric" not in train.early_stopping.model_fields_set:
            train.early_stopping = EarlyStoppingConfig(metric="epoch", mode="max")
        if "grad_clip_norm" not in train.model_fields_set:
            train.grad_clip_norm = None
        elif train.grad_clip_norm is not None:
            raise ValueError(
                "train.grad_clip_norm: clipping the generator's and the discriminator's "
                "gradients together ties one player's step to the other's; set it to null"
            )

    def resolved(self) -> dict:
        """The resolved config as plain data, which validates back to this config: for a
        task that acts, without the settings it refuses."""
        dumped = self.model_dump(mode="json")
        if self.task.acts:
            del dumped["data"]
            dumped["train"] = {k: dumped["train"][k] for k in sorted(ACTING_TRAIN_FIELDS)}
            dumped["scaling"] = {k: dumped["scaling"][k] for k in sorted(ACTING_SCALING_FIELDS)}
        return dumped

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)
