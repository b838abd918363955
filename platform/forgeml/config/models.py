"""The ``model`` section: one variant per registered model family. Each states which
kinds of data it reads and the task it is made for, if only one (the capability half of
the model registry; ``forgeml.models`` holds the builders)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from forgeml.config.base import Section


class ModelSection(Section):
    """What every model states about itself besides its fields."""

    #: The kinds of data it reads (``DataConfig.kind``).
    reads: ClassVar[tuple[str, ...]] = ()
    #: The one task it is made for; None: any task whose data it reads.
    made_for: ClassVar[str | None] = None

    init_from: str | None = Field(
        None,
        description="Weights the model starts from (transfer learning): a model registered "
        "in this storage ('name' or 'name:vN'), or a weights file, a path or an s3:// URI: "
        "'.pt' (a state dict, or a forgeml model.pt) or '.safetensors'. Tensors whose name "
        "and shape match are loaded (the pretrained parameters); the run record lists them, "
        "those skipped for their shape (a new head) and the model's parameters the weights "
        "lack. A resumed run starts from its checkpoint instead.",
    )


class CNNConfig(ModelSection):
    """A stack of conv blocks (conv-BN-ReLU, pooling) and a linear classifier."""

    reads = ("images",)

    kind: Literal["cnn"] = Field("cnn", description="Selects this variant.")
    width: int = Field(
        32, ge=4, le=512, description="Channels of the first block; doubles per block."
    )
    depth: int = Field(3, ge=1, le=6, description="Number of conv blocks.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the classifier.")


class MLPConfig(ModelSection):
    """Fully connected layers (linear, optional batch norm, ReLU, dropout) over flat features."""

    reads = ("images", "tabular")

    kind: Literal["mlp"] = Field("mlp", description="Selects this variant.")
    hidden: list[int] = Field(
        default_factory=lambda: [64, 64], min_length=1, description="Width of each hidden layer."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each hidden layer.")
    batch_norm: bool = Field(False, description="Batch norm after each hidden linear layer.")

    @model_validator(mode="after")
    def _widths(self) -> MLPConfig:
        if min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be >= 1 (got {self.hidden})")
        return self


class BagOfNgramsConfig(ModelSection):
    """A fastText-style text classifier: the mean of the embeddings of a text's tokens and
    of its hashed runs of neighbouring tokens, then a linear layer. What practitioners try
    first on short texts and small sets: it trains in seconds and rarely overfits."""

    reads = ("text",)

    kind: Literal["bag_of_ngrams"] = Field("bag_of_ngrams", description="Selects this variant.")
    embedding_dim: int = Field(64, ge=8, le=1024, description="Width of every embedding.")
    ngrams: int = Field(
        2, ge=1, le=4, description="Longest run of neighbouring tokens embedded (1: tokens only)."
    )
    buckets: int = Field(
        1 << 16,
        ge=1024,
        le=1 << 22,
        description="Hashed embeddings shared by all runs of two or more tokens.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the linear layer.")


def _autoregressive_field():
    """The forecasters' switch, shared by the sequence models that can forecast."""
    return Field(
        None,
        description="Forecasters: add a linear autoregression on the window's values to the "
        "forecast (LSTNet's highway), started at the ridge regression of the training "
        "windows, so the network learns only what is not linear. null: on for series, off "
        "for text.",
    )


class TransformerConfig(ModelSection):
    """A Transformer encoder over token ids: embeddings plus learned positions, pre-norm
    encoder layers, mean pooling over the real (not padding) tokens, a linear head."""

    reads = ("text", "series")

    kind: Literal["transformer"] = Field("transformer", description="Selects this variant.")
    d_model: int = Field(64, ge=8, description="Embedding and hidden width.")
    heads: int = Field(4, ge=1, description="Attention heads (divides d_model).")
    layers: int = Field(2, ge=1, le=12, description="Encoder layers.")
    feedforward: int = Field(128, ge=8, description="Width of each layer's feed-forward part.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the encoder and head.")
    autoregressive: bool | None = _autoregressive_field()

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerConfig:
        if self.d_model % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide d_model ({self.d_model})")
        return self


class RNNConfig(ModelSection):
    """An LSTM or GRU over token embeddings, optionally bidirectional, mean-pooled over
    the real tokens, then a linear head."""

    reads = ("text", "series")

    kind: Literal["rnn"] = Field("rnn", description="Selects this variant.")
    cell: Literal["lstm", "gru"] = Field("lstm", description="Recurrent cell.")
    embedding_dim: int = Field(64, ge=8, description="Token embedding width.")
    hidden: int = Field(64, ge=8, description="Hidden units per direction.")
    layers: int = Field(1, ge=1, le=4, description="Stacked recurrent layers.")
    bidirectional: bool = Field(True, description="Read the text in both directions.")
    dropout: float = Field(
        0.2, ge=0, lt=1, description="Dropout on embeddings and before the head."
    )
    pooling: Literal["mean", "max"] = Field(
        "mean",
        description="How a text classifier sums up the states of the real tokens: their "
        "mean, or each unit's largest value (forecasters read the last state).",
    )
    autoregressive: bool | None = _autoregressive_field()


class CausalTransformerConfig(TransformerConfig):
    """A decoder-only Transformer language model: every position attends to the ones
    before it; the output layer shares the token embedding's weights."""

    reads = ("corpus",)
    made_for = "language_model"

    kind: Literal["causal_transformer"] = Field(
        "causal_transformer", description="Selects this variant."
    )


class Seq2SeqTransformerConfig(TransformerConfig):
    """An encoder-decoder Transformer (``layers`` each): the decoder attends to the
    tokens it has written and to the encoded source; output layer tied to the shared
    token embedding."""

    reads = ("text_pair",)
    made_for = "seq2seq"

    kind: Literal["seq2seq_transformer"] = Field(
        "seq2seq_transformer", description="Selects this variant."
    )


class ConvVAEConfig(ModelSection):
    """A convolutional variational autoencoder over images whose values are categories
    (die codes 0 to 2 for wafer maps): a strided-conv encoder to a Gaussian latent, a
    transposed-conv decoder to per-pixel category logits."""

    reads = ("images",)
    made_for = "vae"

    kind: Literal["conv_vae"] = Field("conv_vae", description="Selects this variant.")
    latent_dim: int = Field(32, ge=2, le=1024, description="Size of the latent code.")
    width: int = Field(
        32, ge=4, le=512, description="Channels of the first conv; doubles per level."
    )
    depth: int = Field(3, ge=1, le=6, description="Stride-2 levels; each halves the image side.")


class DCGANConfig(ModelSection):
    """A DCGAN: a transposed-conv generator from a Gaussian latent to per-pixel category
    logits, sampled straight-through (Gumbel-softmax) so that the discriminator sees
    one-hot maps from both sides, and a strided-conv discriminator."""

    reads = ("images",)
    made_for = "gan"

    kind: Literal["dcgan"] = Field("dcgan", description="Selects this variant.")
    latent_dim: int = Field(64, ge=2, le=1024, description="Size of the generator's noise.")
    width: int = Field(
        32, ge=4, le=512, description="Channels of the finest level; doubles per level."
    )
    depth: int = Field(3, ge=1, le=6, description="Stride-2 levels; each halves the image side.")


class PolicyMLPConfig(ModelSection):
    """RLlib's default networks for flat observations: fully connected layers to the
    policy's outputs (action logits, a Gaussian's mean and log-std, or Q-values) and,
    for PPO, a value function of the same shape beside them."""

    reads = ("environment",)
    made_for = "reinforcement"

    kind: Literal["policy_mlp"] = Field("policy_mlp", description="Selects this variant.")
    hidden: list[int] = Field(
        default_factory=lambda: [64, 64], min_length=1, description="Width of each hidden layer."
    )
    activation: Literal["tanh", "relu", "linear"] = Field("tanh", description="Hidden activation.")
    share_value_layers: bool = Field(
        False, description="PPO: the value function shares the policy's hidden layers."
    )

    @model_validator(mode="after")
    def _widths(self) -> PolicyMLPConfig:
        if min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be >= 1 (got {self.hidden})")
        return self


ModelConfig = Annotated[
    CNNConfig
    | MLPConfig
    | TransformerConfig
    | RNNConfig
    | BagOfNgramsConfig
    | CausalTransformerConfig
    | Seq2SeqTransformerConfig
    | ConvVAEConfig
    | DCGANConfig
    | PolicyMLPConfig,
    Field(discriminator="kind"),
]
