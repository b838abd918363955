"""Tables: numeric and categorical features and one target column.

Fitting runs as one Ray Data ``aggregate`` over the training split (Ray's Count, Mean,
Std, Min, Max, ApproximateQuantile and ValueCounter), so it streams over data of any
size. The fitted state is plain JSON and the transform is a few NumPy operations, so
the Serve replica needs neither Ray Data nor scikit-learn: scikit-learn's
ColumnTransformer would need the training split in one process's memory, and Ray's own
preprocessors have no median imputation and no missing-value indicators.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
from ray.data.aggregate import ApproximateQuantile, Count, Max, Mean, Min, Std, ValueCounter

from forgeml.config import ExperimentConfig
from forgeml.config import TabularFeatures as TabularConfig
from forgeml.data.base import (
    InputReduction,
    ModelInputs,
    TargetSpec,
    register_features,
    register_preprocessor,
)
from forgeml.data.columns import (
    mark_class_rejects,
    no_rejects,
    parse_categories,
    parse_numbers,
    unseen_class_reasons,
)
from forgeml.data.reduction import fit_reduction, kept_columns

#: The category drift summaries give a value that training never saw.
UNSEEN_CATEGORY = "(unseen)"


@dataclass(frozen=True)
class TableFeatures:
    """The columns ``data.features`` names, checked row by row before anything is fitted."""

    cfg: TabularConfig
    task: str
    id_column: str | None
    seed: int = 0
    columns: list[str] = field(init=False)
    augmentable = False

    def __post_init__(self):
        extra = [self.id_column] if self.id_column else []
        cols = [*self.cfg.numeric, *self.cfg.categorical, self.cfg.target, *extra]
        object.__setattr__(self, "columns", cols)

    def classes(self, batch):
        return None if self.task == "regression" else parse_categories(batch[self.cfg.target])

    def reject_reasons(self, batch):
        """Numbers that do not parse, and a missing or unusable target."""
        target = self.cfg.target
        reasons = no_rejects(len(batch[target]))
        for column in self.cfg.numeric:
            _, bad = parse_numbers(batch[column])
            reasons[bad & (reasons == "")] = f"{column}: not a finite number"
        if self.task == "regression":
            values, bad = parse_numbers(batch[target])
            reasons[bad & (reasons == "")] = f"{target}: not a finite number"
            reasons[np.isnan(values) & ~bad & (reasons == "")] = f"{target}: missing target"
        else:
            mark_class_rejects(reasons, batch[target], target, self.cfg.class_names)
        return reasons

    def compact(self, batch, reasons):
        return batch

    def _typed(self, batch) -> pa.Table:
        """Raw training rows as typed Arrow columns with nulls, what the aggregations read."""
        columns = {}
        for column in self.cfg.numeric:
            values, _ = parse_numbers(batch[column])
            columns[column] = pa.array(values, mask=np.isnan(values))
        for column in self.cfg.categorical:
            columns[column] = pa.array(parse_categories(batch[column]), type=pa.string())
        if self.task == "regression":
            values, _ = parse_numbers(batch[self.cfg.target])
            columns[self.cfg.target] = pa.array(values, mask=np.isnan(values))
        else:
            columns[self.cfg.target] = pa.array(
                parse_categories(batch[self.cfg.target]), type=pa.string()
            )
        return pa.table(columns)

    def fit(self, train):
        cfg, target = self.cfg, self.cfg.target
        aggregations = [Count(alias_name="rows")]
        for c in cfg.numeric:
            aggregations += [
                Count(c, ignore_nulls=True, alias_name=f"present:{c}"),
                Mean(c, alias_name=f"mean:{c}"),
                Std(c, ddof=0, alias_name=f"std:{c}"),
                Min(c, alias_name=f"min:{c}"),
                Max(c, alias_name=f"max:{c}"),
            ]
            if cfg.impute.numeric == "median":
                aggregations.append(ApproximateQuantile(c, [0.5], alias_name=f"median:{c}"))
        for c in cfg.categorical:
            aggregations += [
                Count(c, ignore_nulls=True, alias_name=f"present:{c}"),
                ValueCounter(c, alias_name=f"counts:{c}"),
            ]
        if self.task == "regression":
            aggregations += [Mean(target, alias_name="target_mean")]
            aggregations += [Std(target, ddof=0, alias_name="target_std")]
        elif not cfg.class_names:
            aggregations.append(ValueCounter(target, alias_name="target_counts"))
        typed = train.map_batches(self._typed, batch_format="numpy")
        stats = typed.aggregate(*aggregations)
        if not stats or not stats["rows"]:
            raise ValueError("the training split is empty: add data or lower the split fractions")
        encoding = TabularPreprocessor.fit(self, stats)
        if cfg.select is None and cfg.pca is None:
            return encoding
        selection, pca = fit_reduction(
            cfg.select,
            cfg.pca,
            train.map_batches(encoding.transform, batch_format="numpy"),
            encoding.feature_names,
            ~encoding.continuous_columns,
            len(encoding.target_spec.classes),
            self.seed,
        )
        return replace(encoding, selection=selection, pca=pca)


def _counts(stats: dict, key: str) -> dict[str, int]:
    found = stats[key] or {"values": [], "counts": []}
    return {v: n for v, n in zip(found["values"], found["counts"], strict=True) if v is not None}


@register_preprocessor
@dataclass(frozen=True)
class TabularPreprocessor:
    """Imputation (with missing indicators), scaling and encoding fitted on the training
    split, and the selection and PCA of the encoded columns the model applies first.

    ``numeric`` and ``categorical`` hold one dict per column: its fill value, its
    centre and scale (numeric) or its categories (categorical), and whether it gets a
    missing-value indicator. ``selection`` holds each encoded column's variance, score
    and whether it is kept; ``pca`` the mean and components (``reduction.py``).
    """

    numeric: list[dict]
    categorical: list[dict]
    encode: str
    target_column: str
    target_spec: TargetSpec
    selection: dict | None = None
    pca: dict | None = None

    kind = "tabular"

    @classmethod
    def fit(cls, features: TableFeatures, stats: dict) -> TabularPreprocessor:
        cfg, rows = features.cfg, stats["rows"]
        numeric = []
        for c in cfg.numeric:
            if not stats[f"present:{c}"]:
                raise ValueError(f"column {c!r} has no values in the training split")
            fill = {
                "mean": stats[f"mean:{c}"],
                "median": (stats.get(f"median:{c}") or [None])[0],
                "constant": cfg.impute.numeric_fill,
            }[cfg.impute.numeric]
            if cfg.scale == "standard":
                center, scale = stats[f"mean:{c}"], stats[f"std:{c}"]
            elif cfg.scale == "minmax":
                center, scale = stats[f"min:{c}"], stats[f"max:{c}"] - stats[f"min:{c}"]
            else:
                center, scale = 0.0, 1.0
            numeric.append(
                {
                    "name": c,
                    "fill": float(fill),
                    "center": float(center),
                    "scale": float(scale) if scale and scale > 1e-12 else 1.0,
                    "indicator": cfg.impute.indicators and stats[f"present:{c}"] < rows,
                }
            )
        categorical = []
        for c in cfg.categorical:
            counts = _counts(stats, f"counts:{c}")
            if not counts:
                raise ValueError(f"column {c!r} has no values in the training split")
            ranked = sorted(counts, key=lambda v: (-counts[v], v))
            fill = (
                ranked[0]
                if cfg.impute.categorical == "most_frequent"
                else cfg.impute.categorical_fill
            )
            categorical.append(
                {
                    "name": c,
                    "fill": fill,
                    "categories": sorted(ranked[: cfg.max_categories]),
                    "indicator": cfg.impute.indicators and stats[f"present:{c}"] < rows,
                }
            )
        if features.task == "regression":
            target = TargetSpec(
                name=cfg.target,
                mean=float(stats["target_mean"]),
                std=float(stats["target_std"]) if stats["target_std"] > 1e-12 else 1.0,
            )
        else:
            classes = cfg.class_names or sorted(_counts(stats, "target_counts"))
            if len(classes) < 2:
                raise ValueError(
                    f"column {cfg.target!r}: the training split holds {len(classes)} class "
                    f"({classes}); classification needs at least 2"
                )
            target = TargetSpec(classes=tuple(classes), name=cfg.target)
        return cls(numeric, categorical, cfg.encode, cfg.target, target)

    def _encoded_columns(self) -> list[tuple[str, bool]]:
        """Each column of ``inputs`` in order: its name, and whether it holds a number
        (a numeric feature's scaled value) rather than a category or a 0/1 indicator."""
        columns = []
        for col in self.numeric:
            columns.append((col["name"], True))
            columns += [(f"{col['name']}_missing", False)] if col["indicator"] else []
        for col in self.categorical:
            if self.encode == "onehot":
                columns += [(f"{col['name']}={value}", False) for value in col["categories"]]
            else:
                columns.append((col["name"], False))
            columns += [(f"{col['name']}_missing", False)] if col["indicator"] else []
        return columns

    @property
    def feature_names(self) -> list[str]:
        """Names of the columns of ``inputs``, in order."""
        return [name for name, _ in self._encoded_columns()]

    @property
    def continuous_columns(self) -> np.ndarray:
        """Which columns of ``inputs`` hold numbers (the others categories or indicators)."""
        return np.array([continuous for _, continuous in self._encoded_columns()])

    @property
    def model_inputs(self) -> ModelInputs:
        width = len(self.feature_names)
        return ModelInputs(shape=(width,), data="tabular", reduction=self._reduction(width))

    def _reduction(self, width: int) -> InputReduction | None:
        """The affine map from the encoded columns to the kept ones or their principal
        components; None without selection or PCA."""
        if self.selection is None and self.pca is None:
            return None
        kept = kept_columns(self.selection) if self.selection else list(range(width))
        offset = np.zeros(width)
        if self.pca is None:
            matrix = np.eye(width)[:, kept]
        else:
            offset[kept] = self.pca["mean"]
            matrix = np.zeros((width, len(self.pca["components"])))
            matrix[kept] = np.asarray(self.pca["components"]).T
        return InputReduction(offset=offset.tolist(), matrix=matrix.tolist())

    @property
    def target(self) -> TargetSpec:
        return self.target_spec

    @property
    def refuses_rows(self) -> bool:
        return bool(self.target_spec.classes)

    def reject_reasons(self, batch):
        if not self.target_spec.classes:
            return no_rejects(len(batch[self.target_column]))
        return unseen_class_reasons(
            batch[self.target_column], self.target_column, self.target_spec.classes
        )

    def transform(self, batch):
        parts = []
        for col in self.numeric:
            values, _ = parse_numbers(batch[col["name"]])
            missing = np.isnan(values)
            values = np.where(missing, col["fill"], values)
            parts.append((values - col["center"]) / col["scale"])
            if col["indicator"]:
                parts.append(missing.astype(np.float64))
        for col in self.categorical:
            values = parse_categories(batch[col["name"]])
            missing = np.equal(values, None)
            values = np.where(missing, col["fill"], values).astype(str)
            if self.encode == "onehot":
                parts += [(values == category).astype(np.float64) for category in col["categories"]]
            else:
                index = {category: i for i, category in enumerate(col["categories"])}
                parts.append(np.array([index.get(v, -1) for v in values], dtype=np.float64))
            if col["indicator"]:
                parts.append(missing.astype(np.float64))
        out = {"inputs": np.stack(parts, axis=1).astype(np.float32)}
        if self.target_column in batch:
            if self.target_spec.classes:
                index = {name: i for i, name in enumerate(self.target_spec.classes)}
                labels = parse_categories(batch[self.target_column])
                out["target"] = np.array([index[label] for label in labels], dtype=np.int64)
            else:
                out["target"] = parse_numbers(batch[self.target_column])[0].astype(np.float32)
        return out

    def request_columns(self, instances):
        numeric = [col["name"] for col in self.numeric]
        known = set(numeric) | {col["name"] for col in self.categorical}
        columns: dict[str, list] = {name: [] for name in known}
        for i, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise ValueError(f"instances.{i}: expected an object of feature values")
            unknown = sorted(set(instance) - known)
            if unknown:
                raise ValueError(
                    f"instances.{i}: unknown features {unknown}; expected some of {sorted(known)}"
                )
            for name in numeric:
                value = instance.get(name)
                if isinstance(value, bool) or (value is not None and parse_numbers([value])[1][0]):
                    raise ValueError(f"instances.{i}.{name}: expected a number, got {value!r}")
            for name in known:
                columns[name].append(instance.get(name))
        return {name: np.array(values, dtype=object) for name, values in columns.items()}

    def input_summary(self, inputs):
        """Each numeric feature in its own units, each categorical feature's category
        ("(unseen)" for one training never saw), and whether a feature with a missing
        indicator was missing."""
        summary, position = {}, 0
        for col in self.numeric:
            summary[col["name"]] = inputs[:, position] * col["scale"] + col["center"]
            position += 1
            position = self._indicator(summary, col, inputs, position)
        for col in self.categorical:
            names = np.asarray([*col["categories"], UNSEEN_CATEGORY], dtype=object)
            if self.encode == "onehot":
                block = inputs[:, position : position + len(col["categories"])]
                index = np.where(block.any(1), block.argmax(1), -1)
                position += len(col["categories"])
            else:
                index = inputs[:, position].astype(np.int64)
                position += 1
            summary[col["name"]] = names[index]
            position = self._indicator(summary, col, inputs, position)
        return summary

    def feature_groups(self) -> tuple[list[str], np.ndarray]:
        """The features, and for each column of ``inputs`` the index of its feature: a
        numeric feature's scaled value or a categorical one's one-hot block, with its
        missing indicator."""
        names = []
        for col in self.numeric:
            names += [col["name"]] * (1 + int(col["indicator"]))
        for col in self.categorical:
            width = len(col["categories"]) if self.encode == "onehot" else 1
            names += [col["name"]] * (width + int(col["indicator"]))
        features = list(dict.fromkeys(names))
        return features, np.array([features.index(name) for name in names])

    @staticmethod
    def _indicator(summary: dict, col: dict, inputs: np.ndarray, position: int) -> int:
        """Add a feature's missing indicator to ``summary``; the position after it."""
        if not col["indicator"]:
            return position
        missing = inputs[:, position] > 0.5
        summary[f"{col['name']}:missing"] = np.where(missing, "missing", "present").astype(object)
        return position + 1

    def describe(self) -> dict:
        described = {
            "kind": "tabular",
            "numeric": [col["name"] for col in self.numeric],
            "categorical": {col["name"]: col["categories"] for col in self.categorical},
        }
        if self.selection:
            names = self.feature_names
            described["selected"] = [names[i] for i in kept_columns(self.selection)]
        if self.pca:
            described["components"] = len(self.pca["components"])
        return described

    def to_dict(self) -> dict:
        state = asdict(self)
        return {"kind": self.kind, **state, "target_spec": self.target_spec.to_dict()}

    @classmethod
    def from_dict(cls, state: dict) -> TabularPreprocessor:
        fields = {k: v for k, v in state.items() if k != "kind"}
        return cls(**{**fields, "target_spec": TargetSpec.from_dict(fields["target_spec"])})


@register_features("tabular")
def tabular_features(cfg: ExperimentConfig) -> TableFeatures:
    return TableFeatures(cfg.data.features, cfg.task.kind, cfg.data.source.id_column, cfg.seed)
