"""The bottom of the data layer: the columns the pipeline adds, what a model is given
(``ModelInputs``) and predicts (``TargetSpec``), the two halves of every data kind, and
the registries the kinds add themselves to.

Every data kind has two halves:

* ``Features``: what the raw columns mean before anything is fitted. It gives each row
  its id and class where it has them (what ``split.py`` splits by), names the rows that
  cannot be used and why, and fits a ``Preprocessor`` on the training split with Ray
  Data aggregations.
* ``Preprocessor``: the fitted state (``preprocessor.json`` in the model package). It
  turns raw columns into model ``inputs`` (and a ``target``), and turns a request's
  instances into raw columns, so serving applies exactly what training applied.

A kind module (``images``, ``tabular``, ``text``, ``series``) registers both halves here;
``kinds`` imports them all and answers lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import ray.data

    from forgeml.config import ExperimentConfig

#: Columns the pipeline adds to raw rows: the row's split and why it is rejected ("" if not).
SPLIT_COLUMN, REJECT_COLUMN = "_split", "_reject"
#: Where a reader found a row: the file's index in the source and the row's within it
#: (-1 for a line that could not be parsed).
FILE_COLUMN, ROW_COLUMN = "_file", "_row"
#: What the split draws by, while rows are split (see ``key_columns``).
UNIT_COLUMN, STRATUM_COLUMN = "_unit", "_stratum"
SPLITS = ("train", "val", "test")
#: Raw text of a line that could not be parsed, kept for the rejects file.
RAW_COLUMN = "_raw"


@dataclass(frozen=True)
class TargetSpec:
    """What the model predicts: classes (classification), a number with the training
    split's mean and standard deviation (regression trains on the standardised value),
    or the next token out of a vocabulary (language models). Forecasts predict
    ``horizon`` standardised values at once."""

    classes: tuple[str, ...] = ()
    name: str = ""
    mean: float = 0.0
    std: float = 1.0
    vocab_size: int = 0
    horizon: int = 0
    #: The loss's weight of each class (training only; empty: every row alike).
    class_weights: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "classes": list(self.classes),
            "class_weights": list(self.class_weights),
        }

    @classmethod
    def from_dict(cls, state: dict) -> TargetSpec:
        return cls(
            **{
                **state,
                "classes": tuple(state.get("classes", ())),
                "class_weights": tuple(state.get("class_weights", ())),
            }
        )


@dataclass(frozen=True)
class InputReduction:
    """A fixed affine map the model applies to its inputs first: ``(x - offset) @ matrix``
    takes a table's D encoded columns to the K its network reads (selected columns, or
    their principal components). Derived from the fitted preprocessor (``preprocessor.json``
    states the selection and the PCA); the rows themselves keep every column."""

    offset: list[float]
    matrix: list[list[float]]

    @property
    def width(self) -> int:
        """K, the number of inputs the network reads."""
        return len(self.matrix[0])


@dataclass(frozen=True)
class ModelInputs:
    """What the model receives per row: the kind of data it comes from (``DataConfig.kind``,
    what a model states it reads), its shape (no batch dimension), its dtype, for token
    ids the vocabulary size, for series windows the steps per season, and for tables with
    selection or PCA the reduction the model applies first."""

    shape: tuple[int, ...]
    data: str
    dtype: str = "float32"
    vocab_size: int = 0
    season: int = 0
    reduction: InputReduction | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, state: dict) -> ModelInputs:
        reduction = state.get("reduction")
        return cls(
            **{
                **state,
                "shape": tuple(state["shape"]),
                "reduction": InputReduction(**reduction) if reduction else None,
            }
        )


class Preprocessor(Protocol):
    """Fitted state: raw columns to model inputs, identical in training and serving."""

    kind: str

    @property
    def model_inputs(self) -> ModelInputs: ...

    @property
    def target(self) -> TargetSpec: ...

    #: Whether ``reject_reasons`` can refuse anything (if not, rows are counted only once).
    refuses_rows: bool

    def reject_reasons(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Reasons ("" if none) for rows only the fitted state can refuse (unseen classes)."""

    def transform(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw columns to ``inputs`` (and ``target`` when the target column is present)."""

    def request_columns(self, instances: list[dict]) -> dict[str, np.ndarray]:
        """A request's instances as raw columns; ValueError naming the instance and field."""

    def input_summary(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Per-row values of the inputs that drift tests compare, by name."""

    def describe(self) -> dict:
        """What a client must send, for ``/v1/models``."""

    def to_dict(self) -> dict: ...


class Features(Protocol):
    """A data kind before fitting: which raw columns it reads and which rows it refuses."""

    columns: list[str]
    augmentable: bool  # whether data.augment applies (images)
    #: The column of each row's stable id; None: rows are known by their position.
    id_column: str | None

    def classes(self, batch: dict[str, np.ndarray]) -> np.ndarray | None:
        """Each row's class as text (what a stratified split balances), or None when the
        rows have no classes."""

    def reject_reasons(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...

    def compact(self, batch: dict[str, np.ndarray], reasons: np.ndarray) -> dict:
        """The batch with its columns in their most compact form for the passes to come."""

    def fit(self, train: ray.data.Dataset) -> Preprocessor:
        """Fit on the usable training rows (raw columns)."""


PREPROCESSORS: dict[str, type] = {}
FEATURES: dict[str, Callable[[ExperimentConfig], Features]] = {}


def register_preprocessor(cls: type) -> type:
    """Register a fitted state class under its ``kind`` (what ``preprocessor.json`` names)."""
    PREPROCESSORS[cls.kind] = cls
    return cls


def register_features(kind: str):
    """Register ``build(cfg) -> Features`` for ``data.features`` of this ``kind``."""

    def decorate(build: Callable[[ExperimentConfig], Features]):
        FEATURES[kind] = build
        return build

    return decorate
