"""The ``task`` section: what is predicted. Each variant states what its task can do (the
capability half of the task registry; ``forgeml.tasks`` holds the implementations), and
validation, the docs, serving and the CLI read it from there."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from forgeml.config.base import Section, variants


class TaskSection(Section):
    """What every task states about itself besides its fields."""

    #: Validation metrics it reports every epoch, besides val_loss and train_loss.
    metrics: ClassVar[tuple[str, ...]] = ()
    #: The kinds of data it learns from (``DataConfig.kind``).
    data: ClassVar[tuple[str, ...]] = ()
    #: Whether Ray Serve's /predict answers it; the others draw samples (forgeml generate).
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


TaskConfig = Annotated[
    ClassificationTask
    | RegressionTask
    | ForecastTask
    | LanguageModelTask
    | Seq2SeqTask
    | VAETask
    | GANTask,
    Field(discriminator="kind"),
]


#: Every validation metric some task reports.
VALIDATION_METRICS = (
    "val_loss",
    *dict.fromkeys(m for task in variants(TaskConfig).values() for m in task.metrics),
)
