"""The ``train`` and ``scaling`` sections: the training loop, its optimizer, schedule,
early stopping, checkpoints and preemption, and the Ray Train workers it runs on."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from forgeml.config.base import Section, variants
from forgeml.config.tasks import VALIDATION_METRICS, TaskConfig


class OptimizerConfig(Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(
        3e-3,
        gt=0,
        description="Peak learning rate. 3e-3 with AdamW, warm-up and cosine decay trains "
        "every default model on every example and unseen data set measured "
        "(docs/benchmarks.md); lower it for a larger model.",
    )
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled (AdamW) or L2 (SGD) decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by AdamW).")
    betas: tuple[float, float] = Field(
        (0.9, 0.999),
        description="AdamW's decay rates of its gradient averages (ignored by SGD); GANs "
        "train with (0.5, 0.999).",
    )
    pretrained_lr_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Learning rate of the parameters model.init_from loaded, as a fraction "
        "of lr (discriminative learning rates): e.g. 0.1 moves a pretrained backbone a tenth "
        "as fast as a new head. The schedule scales both alike.",
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerConfig:
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must each be in [0, 1) (got {list(self.betas)})")
        return self


class ConstantSchedule(Section):
    kind: Literal["constant"] = Field("constant", description="Selects this variant.")


class CosineSchedule(Section):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last epoch (per step)."""

    kind: Literal["cosine"] = Field("cosine", description="Selects this variant.")
    warmup_epochs: float = Field(1.0, ge=0, description="Epochs of linear warm-up.")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Final lr as a share of lr.")


class StepSchedule(Section):
    kind: Literal["step"] = Field("step", description="Selects this variant.")
    step_epochs: int = Field(5, ge=1, description="Multiply lr by gamma every step_epochs.")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor.")


class PlateauSchedule(Section):
    """Reduce lr when the early-stopping metric stops improving."""

    kind: Literal["plateau"] = Field("plateau", description="Selects this variant.")
    factor: float = Field(0.5, gt=0, lt=1, description="Multiply lr by this on a plateau.")
    patience: int = Field(2, ge=0, description="Epochs without improvement before reducing.")


Schedule = Annotated[
    ConstantSchedule | CosineSchedule | StepSchedule | PlateauSchedule,
    Field(discriminator="kind"),
]


class EarlyStoppingConfig(Section):
    enabled: bool = Field(True, description="Stop when the metric stops improving.")
    metric: Literal[(*VALIDATION_METRICS, "epoch")] = Field(
        "val_loss",
        description="Validation metric watched by early stopping and checkpoints; val_loss, "
        "the default, because every task reports it and it moves before accuracy does; "
        + ", ".join(
            f"{kind} reports {' and '.join(task.metrics)}"
            for kind, task in variants(TaskConfig).items()
        )
        + ". epoch (mode max) keeps the last epoch and never stops early: for GANs, whose "
        "losses do not measure how good their images are.",
    )
    mode: Literal["min", "max"] = Field("min", description="Whether smaller or larger is better.")
    patience: int = Field(
        4,
        ge=1,
        description="Epochs without improvement before stopping; the best epoch is kept.",
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as improvement.")

    @model_validator(mode="after")
    def _epoch_keeps_the_last(self) -> EarlyStoppingConfig:
        if self.metric == "epoch" and (self.mode != "max" or self.min_delta):
            raise ValueError(
                "metric epoch keeps the last epoch: it needs mode max and min_delta 0 "
                f"(got mode {self.mode}, min_delta {self.min_delta:g})"
            )
        return self


class CheckpointConfig(Section):
    keep_top_k: int = Field(2, ge=1, description="Checkpoints kept, best by the watched metric.")


class PreemptionConfig(Section):
    """A node reclaimed after a notice (a spot instance, a Kubernetes eviction, drained
    by the autoscaler with DRAIN_NODE_REASON_PREEMPTION and a deadline)."""

    max_restarts: int = Field(
        -1,
        ge=-1,
        description="Preemptions recovered from the last checkpoint, counted apart from "
        "max_failures (a reclaimed node is not the run's fault); -1: always.",
    )
    checkpoint_on_notice: bool = Field(
        True,
        description="On a notice, checkpoint at a step boundary and again just before "
        "the deadline, so a preemption loses a few steps, not the epoch in progress.",
    )
    check_interval_s: float = Field(
        0.5,
        ge=0,
        description="How often the ranks ask Ray Train for notices (a collective), as a "
        "step count set from the last epoch's step time; 0: after every step. A notice "
        "is seen at most this late, and the checkpoint before the deadline comes this "
        "much earlier.",
    )


class FreezeConfig(Section):
    """Parameters that do not train, for the whole run or its first epochs."""

    params: Literal["pretrained"] | list[str] = Field(
        "pretrained",
        description="pretrained: those model.init_from loaded (all but a new head); or "
        "shell-style patterns of parameter names as the model's state dict names them, "
        "e.g. ['features.*'].",
    )
    epochs: int | None = Field(
        None,
        ge=1,
        description="Frozen for the first N epochs, then trained; null: the whole run.",
    )

    @field_validator("params")
    @classmethod
    def _some(cls, params):
        if params == []:
            raise ValueError("name at least one pattern, or pretrained")
        return params


class TrainConfig(Section):
    max_epochs: int = Field(
        12,
        ge=1,
        description="Upper bound on epochs; early stopping usually ends a run sooner.",
    )
    batch_size: int = Field(128, ge=1, description="Per-worker batch size.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: Schedule = Field(default_factory=CosineSchedule, description="LR schedule.")
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig,
        description="The watched validation metric: early stopping, checkpoint ranking, "
        "plateau schedule and the registered (best) epoch all use it.",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoint retention."
    )
    freeze: FreezeConfig | None = Field(
        None, description="Parameters kept as they start (fine-tuning); null: all train."
    )
    grad_clip_norm: float | None = Field(1.0, gt=0, description="Clip gradients; null disables.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU."
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker failures recovered from the last checkpoint (-1: always)."
    )
    preemption: PreemptionConfig = Field(
        default_factory=PreemptionConfig, description="Nodes reclaimed with a notice."
    )


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = Field(
        1,
        description="Ray Train workers (DDP ranks): a number, or [min, max] for an elastic "
        "run, which starts with as many workers as the cluster holds (at least min) and "
        "grows or shrinks with the cluster, restarting from its latest checkpoint. Every "
        "optimizer step sees the same global batch at any size (train.batch_size).",
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker; null: cpus_per_worker."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers' bundles: PACK on as few nodes as it can "
        "(fastest all-reduce), SPREAD over as many, STRICT_PACK all on one node, "
        "STRICT_SPREAD each on its own node (survives a node loss with fewer ranks lost).",
    )
    label_selector: dict[str, str] | None = Field(
        None,
        description="Node labels every worker's node must match, as Ray label selectors: "
        "{'pool': 'train'}, '!spot', 'in(a,b)', '!in(a,b)'. Null: any node.",
    )
    resize_interval_s: float = Field(
        60.0,
        ge=0,
        description="Elastic runs: how often a healthy run checks whether the cluster now "
        "holds more or fewer workers. A resize restarts the workers from the latest "
        "checkpoint, so the work since then is done again.",
    )

    @field_validator("label_selector")
    @classmethod
    def _valid_selector(cls, selector: dict[str, str] | None) -> dict[str, str] | None:
        from ray._private.label_utils import validate_label_selector

        problem = validate_label_selector(selector)
        if problem:
            raise ValueError(problem)
        return selector

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, workers: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (workers, workers) if isinstance(workers, int) else workers
        if low < 1:
            raise ValueError(f"at least 1 worker, got {low}")
        if low > high:
            raise ValueError(f"[min, max] with min <= max, got [{low}, {high}]")
        return low if low == high else (low, high)

    @model_validator(mode="after")
    def _elastic_placement(self) -> ScalingConfig:
        # Ray 2.60 sizes an elastic group by counting the workers every node's total
        # resources hold; it ignores label selectors and strict strategies, so the group
        # it picks could wait forever for nodes those constraints accept.
        if not self.elastic:
            return self
        if self.label_selector:
            raise ValueError(
                "label_selector cannot be combined with an elastic num_workers range: Ray "
                "sizes elastic groups by every node's resources, not only the selected ones"
            )
        if self.placement_strategy.startswith("STRICT_"):
            raise ValueError(
                f"placement_strategy {self.placement_strategy} cannot be combined with an "
                "elastic num_workers range: Ray sizes elastic groups without it; use PACK "
                "or SPREAD"
            )
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def world_sizes(self) -> range:
        """Every number of workers a run may have."""
        return range(self.min_workers, self.max_workers + 1)
