"""The ``task`` section: what is predicted. Each variant states what its task can do (the
capability half of the task registry; ``forgeml.tasks`` holds the implementations), and
validation, the docs, serving and the CLI read it from there."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from forgeml.config.base import Section, variants


class TaskSection(Section):
    """What every task states about itself besides its fields."""

    #: Validation metrics it reports every epoch, besides val_loss and train_loss.
    metrics: ClassVar[tuple[str, ...]] = ()
    #: The kinds of data it learns from (``DataConfig.kind``).
    data: ClassVar[tuple[str, ...]] = ()
    #: Whether Ray Serve's /predict answers it; a policy (``acts``) answers /act, the
    #: others draw samples (forgeml generate).
    served: ClassVar[bool] = False
    #: Whether only the models made for it (``ModelSection.made_for``) fit it.
    own_models: ClassVar[bool] = False
    #: Whether it draws new images after training (read as value codes, rated by a judge).
    draws_images: ClassVar[bool] = False
    #: Whether it writes text (forgeml generate samples it, evaluation scores it).
    writes_text: ClassVar[bool] = False
    #: Whether what it writes answers a prompt text (forgeml generate --prompt).
    needs_prompts: ClassVar[bool] = False
    #: Whether its rows have classes (what a stratified split balances).
    has_classes: ClassVar[bool] = False
    #: Whether it learns by acting in an environment (``env``) rather than from data.
    acts: ClassVar[bool] = False


class ClassificationTask(TaskSection):
    """One class per row out of the classes the data holds: cross-entropy, accuracy, macro F1."""

    metrics = ("val_accuracy", "val_macro_f1")
    data = ("images", "tabular", "text")
    served = True
    has_classes = True

    kind: Literal["classification"] = Field("classification", description="Selects this variant.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="Weights of the classes in the loss. none: every row alike, which is what "
        "accuracy rewards; balanced: each class by the inverse of its share of the training "
        "rows (scikit-learn's balanced), which trades accuracy for the recall of rare classes.",
    )


class RegressionTask(TaskSection):
    """One numeric target, standardised with training statistics while training; metrics
    and predictions are in the target's own units."""

    metrics = ("val_rmse", "val_mae", "val_r2")
    data = ("tabular",)
    served = True

    kind: Literal["regression"] = Field("regression", description="Selects this variant.")
    loss: Literal["mse", "huber", "l1"] = Field("mse", description="Training loss.")


class ForecastTask(TaskSection):
    """Every step of a horizon at once; trained on values standardised with the training
    split's statistics, scored (RMSE, MAE, MAPE) in the series' units on observed values."""

    metrics = ("val_rmse", "val_mae")
    data = ("series",)
    served = True

    kind: Literal["forecast"] = Field("forecast", description="Selects this variant.")
    loss: Literal["mse", "huber", "l1"] = Field("mse", description="Training loss.")


class LanguageModelTask(TaskSection):
    """Next-token prediction over a corpus: cross-entropy per real token, perplexity."""

    metrics = ("val_perplexity",)
    data = ("corpus",)
    own_models = True
    writes_text = True

    kind: Literal["language_model"] = Field("language_model", description="Selects this variant.")


class Seq2SeqTask(TaskSection):
    """Text to text: next-token cross-entropy with the target's own tokens as decoder
    input (teacher forcing); tested by greedy decoding: corpus BLEU (sacrebleu) and
    exact match."""

    metrics = ("val_perplexity",)
    data = ("text_pair",)
    own_models = True
    writes_text = True
    needs_prompts = True

    kind: Literal["seq2seq"] = Field("seq2seq", description="Selects this variant.")


class JudgeConfig(Section):
    """A registered image classifier that rates generated maps, as a wafer engineer's
    triage model would rate real ones."""

    model: str = Field(description="Registered classifier, NAME or NAME:vN, in this storage.")
    min_confidence: float = Field(
        0.9, gt=0, lt=1, description="Probability from which a class assignment counts."
    )
    no_defect_class: str = Field(
        "none", description="The class that means no defect pattern; every other is a defect."
    )


class ImageGenerationTask(TaskSection):
    data = ("images",)
    own_models = True
    draws_images = True

    samples: int = Field(
        512, ge=16, le=100_000, description="Images drawn after training, to rate and to show."
    )
    judge: JudgeConfig | None = Field(
        None, description="Classifier that rates the drawn images; none: they are only shown."
    )


class VAETask(ImageGenerationTask):
    """Learn the images' distribution by maximising the evidence lower bound (ELBO): the
    likelihood of every pixel's category under the decoder, minus the latent code's KL
    divergence from the prior. Loss and metrics are per image, in nats."""

    metrics = ("val_reconstruction_error",)

    kind: Literal["vae"] = Field("vae", description="Selects this variant.")


class GANTask(ImageGenerationTask):
    """Adversarial training (non-saturating loss): the discriminator learns to tell real
    images from generated ones, the generator to be taken for real. Both players step on
    every batch together, so one optimizer and one checkpoint hold them. Unless the
    config says otherwise, training keeps the last epoch (train.early_stopping.metric
    epoch) and does not clip gradients, which would tie one player's step to the
    other's."""

    metrics = ("val_discriminator_accuracy",)

    kind: Literal["gan"] = Field("gan", description="Selects this variant.")


class PPOAlgorithm(Section):
    """Proximal Policy Optimization (RLlib's PPO): each iteration collects
    ``train_batch_size`` environment steps with the current policy, then takes
    ``num_epochs`` passes of clipped policy-gradient steps over them. The defaults are
    the original paper's, which most PPO libraries share."""

    name: Literal["ppo"] = Field("ppo", description="Selects this variant.")
    lr: float = Field(3e-4, gt=0, le=1, description="Adam learning rate.")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor of future rewards.")
    gae_lambda: float = Field(
        0.95, ge=0, le=1, description="Generalised advantage estimation's lambda."
    )
    train_batch_size: int = Field(
        4000, ge=64, description="Environment steps collected per training iteration."
    )
    minibatch_size: int = Field(128, ge=8, description="Steps per gradient step.")
    num_epochs: int = Field(10, ge=1, le=100, description="Passes over each collected batch.")
    clip: float = Field(0.2, gt=0, lt=1, description="Clip range of the policy ratio.")
    entropy_coeff: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    vf_loss_coeff: float = Field(0.5, ge=0, description="Weight of the value-function loss.")
    vf_clip: float | None = Field(
        None,
        gt=0,
        description="Clip each step's squared value error at this; null: no clip. RLlib's "
        "own default (10) stops the value function learning from returns far above it.",
    )
    grad_clip: float | None = Field(0.5, gt=0, description="Global gradient-norm clip; null: none.")


class DQNAlgorithm(Section):
    """Deep Q-learning (RLlib's DQN, double and dueling Q by default): epsilon-greedy
    steps fill a replay buffer; gradient steps on sampled batches move the Q-network
    towards a target network that follows it every ``target_update_steps``. Discrete
    actions only."""

    name: Literal["dqn"] = Field("dqn", description="Selects this variant.")
    lr: float = Field(5e-4, gt=0, le=1, description="Adam learning rate.")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor of future rewards.")
    train_batch_size: int = Field(32, ge=1, description="Replayed steps per gradient step.")
    replay_capacity: int = Field(50_000, ge=100, description="Steps the replay buffer holds.")
    target_update_steps: int = Field(
        500, ge=1, description="Environment steps between target-network updates."
    )
    epsilon: tuple[float, float] = Field(
        (1.0, 0.05), description="Exploration rate at the start and at the end of its decay."
    )
    epsilon_steps: int = Field(
        10_000, ge=1, description="Environment steps over which epsilon decays linearly."
    )
    n_step: int = Field(1, ge=1, le=20, description="Steps summed into each return target.")
    double_q: bool = Field(True, description="Double Q-learning's target.")
    dueling: bool = Field(True, description="Separate value and advantage heads.")
    grad_clip: float | None = Field(
        40.0, gt=0, description="Global gradient-norm clip; null: none."
    )

    @field_validator("epsilon")
    @classmethod
    def _probabilities(cls, epsilon: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= epsilon[1] <= epsilon[0] <= 1:
            raise ValueError("needs 0 <= end <= start <= 1")
        return epsilon


Algorithm = Annotated[PPOAlgorithm | DQNAlgorithm, Field(discriminator="name")]


class ReinforcementTask(TaskSection):
    """Learn a policy that maximises an environment's return (``env``), with RLlib. Each
    iteration collects environment steps on the env runners (``scaling.num_workers``
    actors of ``scaling.cpus_per_worker`` CPUs each) and updates the policy in the trial;
    the run stops at ``max_iterations``, ``max_env_steps`` or once the mean return of
    the last episodes reaches ``target_return``. The policy registered is then scored
    on ``evaluation_episodes`` new episodes, seeded apart from training, acting
    greedily."""

    metrics = ("episode_return_mean",)
    data = ("environment",)
    own_models = True
    acts = True

    kind: Literal["reinforcement"] = Field("reinforcement", description="Selects this variant.")
    algorithm: Algorithm = Field(
        default_factory=PPOAlgorithm,
        description="The algorithm and its hyperparameters; a name alone (ppo, dqn) keeps "
        "its defaults.",
    )
    envs_per_runner: int = Field(
        4, ge=1, le=256, description="Environment copies each env runner steps as one batch."
    )
    max_iterations: int = Field(200, ge=1, description="Training iterations at most.")
    max_env_steps: int | None = Field(
        None, ge=1, description="Environment steps at most; null: no limit."
    )
    target_return: float | None = Field(
        None,
        description="Stop once the mean return of the last training episodes reaches it; "
        "null: train to the limits.",
    )
    checkpoint_every: int = Field(
        5,
        ge=1,
        description="Iterations between checkpoints (a resumed run repeats at most "
        "these); the last iteration is always kept.",
    )
    evaluation_episodes: int = Field(
        100, ge=1, le=10_000, description="Episodes the registered policy is scored on."
    )

    @field_validator("algorithm", mode="before")
    @classmethod
    def _name_alone(cls, algorithm: Any) -> Any:
        """``algorithm: ppo`` is ``algorithm: {name: ppo}``."""
        return {"name": algorithm} if isinstance(algorithm, str) else algorithm


TaskConfig = Annotated[
    ClassificationTask
    | RegressionTask
    | ForecastTask
    | LanguageModelTask
    | Seq2SeqTask
    | VAETask
    | GANTask
    | ReinforcementTask,
    Field(discriminator="kind"),
]


#: Every validation metric some task reports.
VALIDATION_METRICS = (
    "val_loss",
    *dict.fromkeys(m for task in variants(TaskConfig).values() for m in task.metrics),
)
