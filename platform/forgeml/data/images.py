"""Images: square single-channel maps or pictures with a class index, read as model
inputs or (generative tasks) as value codes that are themselves the target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from forgeml.data.base import ModelInputs, TargetSpec, register_preprocessor
from forgeml.data.columns import category, no_rejects


def _pixel_count(image) -> int:
    if image is None:
        return 0
    return len(image) if isinstance(image, bytes) else int(np.size(image))


def _within(image, max_value: int) -> bool:
    """Whether every value of an image (raw bytes or an array) lies in 0..max_value."""
    values = np.frombuffer(image, np.uint8) if isinstance(image, bytes) else np.asarray(image)
    return bool(values.min(initial=0) >= 0 and values.max(initial=0) <= max_value)


def _stack(column: np.ndarray) -> np.ndarray:
    """Per-row images (raw bytes, one per pixel, or arrays) as one (N, ...) array."""
    if len(column) and isinstance(column[0], bytes):
        return np.frombuffer(b"".join(column), np.uint8).reshape(len(column), -1)
    return np.stack(column)


def decode_images(column, image_size: int, name: str = "image") -> np.ndarray:
    """An image column (raw bytes, or flat or nested arrays of any list layout) as a
    (N, size, size) uint8 array."""
    images = _stack(column) if column.dtype == object else np.asarray(column)
    if images.size != len(images) * image_size * image_size:
        raise ValueError(
            f"column {name!r}: expected {image_size}x{image_size} values per row, "
            f"got {images.size // max(len(images), 1)}"
        )
    return images.reshape(len(images), image_size, image_size)


#: The largest die code of a wafer map (0 outside the wafer, 1 good die, 2 defective).
WAFER_MAX = 2


@dataclass(frozen=True)
class ImageFeatures:
    """Square single-channel images in ``image_column`` (values 0 to ``max_value``: die
    codes 0 to 2 for wafer maps, grey levels to 255 for pictures) and a class index in
    ``label_column``. With ``codes`` the model reads each value as a category, and the
    image itself is the target (generative models)."""

    id_column: str
    image_column: str
    label_column: str
    image_size: int
    class_names: tuple[str, ...]
    max_value: int = WAFER_MAX
    codes: bool = False
    columns: list[str] = field(init=False)
    augmentable = True

    def __post_init__(self):
        columns = [self.id_column, self.image_column, self.label_column]
        object.__setattr__(self, "columns", columns)

    def classes(self, batch):
        if self.codes:
            return None
        names = {str(i): name for i, name in enumerate(self.class_names)}
        return np.array(
            [names.get(category(label)) for label in batch[self.label_column]], dtype=object
        )

    def reject_reasons(self, batch):
        """Maps of the wrong size or with values outside 0 to ``max_value``, and (unless
        the images are codes for a generative model) labels that are missing or not a
        class index."""
        reasons = no_rejects(len(batch[self.id_column]))
        pixels = self.image_size * self.image_size
        for i, image in enumerate(batch[self.image_column]):
            if _pixel_count(image) != pixels:
                reasons[i] = (
                    f"{self.image_column}: expected {self.image_size}x{self.image_size} "
                    "values per row"
                )
            elif not _within(image, self.max_value):
                reasons[i] = f"{self.image_column}: values must be 0 to {self.max_value}"
        if self.codes:  # generative models learn from the images alone: any label will do
            return reasons
        labels = np.asarray(batch[self.label_column], dtype=np.float64)
        bad = ~np.isfinite(labels) | (labels < 0) | (labels >= len(self.class_names))
        bad |= labels != np.round(labels)
        reasons[bad & (reasons == "")] = (
            f"{self.label_column}: not a class index 0..{len(self.class_names) - 1}"
        )
        return reasons

    def compact(self, batch, reasons):
        """Images as one (N, pixels) uint8 array instead of an array of per-row values,
        which Ray Data moves and converts several times slower, when every row has the
        right size (otherwise rows stay as read, so rejected ones keep their values)."""
        column = batch[self.image_column]
        if column.dtype == object and not (reasons != "").any():
            batch[self.image_column] = _stack(column).reshape(len(column), -1).astype(np.uint8)
        return batch

    def fit(self, train):
        moments = train.map_batches(
            _pixel_moments,
            fn_kwargs={"column": self.image_column, "size": self.image_size},
            batch_format="numpy",
        ).sum(["n", "s", "ss"])
        if not moments or not moments["sum(n)"]:
            raise ValueError("the training split is empty: add data or lower the split fractions")
        return ImagePreprocessor.from_moments(
            self, moments["sum(n)"], moments["sum(s)"], moments["sum(ss)"]
        )


def _pixel_moments(batch, column: str, size: int):
    x = decode_images(batch[column], size, column).astype(np.float64)
    return {"n": [x.size], "s": [x.sum()], "ss": [np.square(x).sum()]}


#: The WM-811K die code of a defective die; its share per map is watched for drift.
DEFECT_CODE = 2


@register_preprocessor
@dataclass(frozen=True)
class ImagePreprocessor:
    """Standardises image values (wafer die codes, or grey levels) with training-split
    moments, for classifiers. With ``codes`` it keeps every value as it is, a category
    out of ``max_value + 1``, and the image is also the target: what generative models
    read and learn to draw."""

    image_size: int
    mean: float
    std: float
    class_names: tuple[str, ...]
    image_column: str = "image"
    label_column: str = "label"
    max_value: int = WAFER_MAX
    codes: bool = False

    kind = "image-standardize"
    refuses_rows = False

    @classmethod
    def from_moments(cls, features: ImageFeatures, count: float, total: float, total_sq: float):
        """Fit from the pixel count, sum and sum of squares of the training images."""
        mean = total / count
        std = max(float(np.sqrt(max(total_sq / count - mean**2, 0.0))), 1e-6)
        return cls(
            image_size=features.image_size,
            mean=float(mean),
            std=std,
            class_names=tuple(features.class_names),
            image_column=features.image_column,
            label_column=features.label_column,
            max_value=features.max_value,
            codes=features.codes,
        )

    @property
    def model_inputs(self) -> ModelInputs:
        side = self.image_size
        if self.codes:
            return ModelInputs(
                shape=(side, side), data="images", dtype="int64", vocab_size=self.max_value + 1
            )
        return ModelInputs(shape=(1, side, side), data="images")

    @property
    def target(self) -> TargetSpec:
        if self.codes:
            return TargetSpec(
                classes=self.class_names, name=self.image_column, vocab_size=self.max_value + 1
            )
        return TargetSpec(classes=self.class_names, name=self.label_column)

    def reject_reasons(self, batch):
        return no_rejects(len(batch[self.image_column]))

    def standardize(self, images: np.ndarray) -> np.ndarray:
        """(N, size, size) raw maps to (N, 1, size, size) float32 model input."""
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected maps of shape (N, {self.image_size}, {self.image_size}), "
                f"got {tuple(images.shape)}"
            )
        x = (images.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        return x[:, None, :, :]

    def transform(self, batch):
        images = decode_images(batch[self.image_column], self.image_size, self.image_column)
        if self.codes:  # uint8 here: a quarter of int64's object-store space
            return {"inputs": images.astype(np.uint8), "target": images.astype(np.uint8)}
        out = {"inputs": self.standardize(images)}
        if self.label_column in batch:
            out["target"] = np.asarray(batch[self.label_column]).astype(np.int64)
        return out

    def request_columns(self, instances):
        expected = (self.image_size, self.image_size)
        maps = []
        for i, instance in enumerate(instances):
            try:
                array = instance.to_array()
            except (AttributeError, ValueError) as exc:
                reason = (
                    exc
                    if isinstance(exc, ValueError)
                    else "an image model needs exactly one of 'image' or 'image_png_base64'"
                )
                raise ValueError(f"instances.{i}: {reason}") from None
            if array.shape != expected:
                raise ValueError(
                    f"instances.{i}: expected a {expected[0]}x{expected[1]} map, "
                    f"got {'x'.join(map(str, array.shape))}"
                )
            if array.max(initial=0) > self.max_value:
                raise ValueError(f"instances.{i}: values must be 0 to {self.max_value}")
            maps.append(array)
        return {self.image_column: np.stack(maps)}

    def input_summary(self, inputs):
        """Wafer maps: the share of defective dies; pictures: the mean grey level (0-1)."""
        levels = inputs.reshape(len(inputs), -1).astype(np.float64)
        if not self.codes:
            levels = np.round(levels * self.std + self.mean)
        if self.max_value == WAFER_MAX:
            return {"defect_fraction": (levels == DEFECT_CODE).mean(1)}
        return {"mean_intensity": levels.mean(1) / self.max_value}

    def describe(self) -> dict:
        return {
            "kind": "image-codes" if self.codes else "image",
            "height": self.image_size,
            "width": self.image_size,
            "max_value": self.max_value,
        }

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, state: dict) -> ImagePreprocessor:
        fields = {k: v for k, v in state.items() if k != "kind"}
        return cls(**{**fields, "class_names": tuple(fields["class_names"])})
