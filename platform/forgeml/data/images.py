"""Images: square maps or pictures, grey (one channel) or RGB (three), with a class
index, read as model inputs or (generative tasks) as value codes that are themselves the
target. Rows hold an image's values channels last (H, W, C), as image files do; models
read them channels first (C, H, W)."""

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


def shape_text(size: int, channels: int) -> str:
    """A square image's shape as users write it: 32x32, or 32x32x3 for RGB."""
    return f"{size}x{size}" + (f"x{channels}" if channels > 1 else "")


#: PIL's grey level of R, G and B (ITU-R 601-2 luma) in 16-bit fixed point, so that
#: arrays and image files are made grey alike.
LUMA_FIXED = np.array([19595, 38470, 7471], np.int64)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Images (N, H, W) or (N, H, W, C) with C of 1, 3 or 4, values 0-255, as uint8
    (N, H, W, ``channels``): grey repeated into RGB, an alpha channel dropped, RGB made
    grey as PIL's L mode does. ValueError for any other layout."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected images (N, H, W) or (N, H, W, 1|3|4), got {tuple(images.shape)}"
        )
    images = images[..., :3].astype(np.uint8)
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, -1)
    grey = (images.astype(np.int64) @ LUMA_FIXED + (1 << 15)) >> 16
    return grey.astype(np.uint8)[..., None]


def decode_images(column, image_size: int, channels: int = 1, name: str = "image") -> np.ndarray:
    """An image column (raw bytes, or flat or nested arrays of any list layout, values
    channels last) as a (N, size, size, channels) array."""
    images = _stack(column) if column.dtype == object else np.asarray(column)
    if images.size != len(images) * image_size * image_size * channels:
        raise ValueError(
            f"column {name!r}: expected {shape_text(image_size, channels)} values per row, "
            f"got {images.size // max(len(images), 1)}"
        )
    return images.reshape(len(images), image_size, image_size, channels)


#: The largest die code of a wafer map (0 outside the wafer, 1 good die, 2 defective).
WAFER_MAX = 2


@dataclass(frozen=True)
class ImageFeatures:
    """Square images of ``channels`` channels in ``image_column`` (values 0 to
    ``max_value``: die codes 0 to 2 for wafer maps, levels to 255 for pictures) and a
    class index in ``label_column``. With ``codes`` the model reads each value as a
    category, and the image itself is the target (generative models)."""

    id_column: str
    image_column: str
    label_column: str
    image_size: int
    class_names: tuple[str, ...]
    max_value: int = WAFER_MAX
    codes: bool = False
    channels: int = 1
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
        values = self.image_size * self.image_size * self.channels
        for i, image in enumerate(batch[self.image_column]):
            if _pixel_count(image) != values:
                reasons[i] = (
                    f"{self.image_column}: expected "
                    f"{shape_text(self.image_size, self.channels)} values per row"
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
        sums = [f"{kind}{c}" for kind in ("s", "ss") for c in range(self.channels)]
        moments = train.map_batches(
            _pixel_moments,
            fn_kwargs={
                "column": self.image_column,
                "size": self.image_size,
                "channels": self.channels,
            },
            batch_format="numpy",
        ).sum(["n", *sums])
        if not moments or not moments["sum(n)"]:
            raise ValueError("the training split is empty: add data or lower the split fractions")
        per_channel = {
            kind: [moments[f"sum({kind}{c})"] for c in range(self.channels)] for kind in ("s", "ss")
        }
        return ImagePreprocessor.from_moments(
            self, moments["sum(n)"], np.array(per_channel["s"]), np.array(per_channel["ss"])
        )


def _pixel_moments(batch, column: str, size: int, channels: int):
    """The pixel count, and each channel's sum and sum of squares, of a batch."""
    x = decode_images(batch[column], size, channels, column).astype(np.float64)
    x = x.reshape(-1, channels)
    sums = {f"s{c}": [x[:, c].sum()] for c in range(channels)}
    squares = {f"ss{c}": [np.square(x[:, c]).sum()] for c in range(channels)}
    return {"n": [len(x)], **sums, **squares}


#: The WM-811K die code of a defective die; its share per map is watched for drift.
DEFECT_CODE = 2


@register_preprocessor
@dataclass(frozen=True)
class ImagePreprocessor:
    """Standardises each channel of an image (wafer die codes, grey levels, or R, G and
    B) with its training-split mean and standard deviation, for classifiers. With
    ``codes`` (one channel) it keeps every value as it is, a category out of
    ``max_value + 1``, and the image is also the target: what generative models read and
    learn to draw."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    image_column: str = "image"
    label_column: str = "label"
    max_value: int = WAFER_MAX
    codes: bool = False
    channels: int = 1

    kind = "image-standardize"
    refuses_rows = False

    @classmethod
    def from_moments(
        cls, features: ImageFeatures, count: float, totals: np.ndarray, squares: np.ndarray
    ):
        """Fit from the pixel count and each channel's sum and sum of squares over the
        training images."""
        mean = totals / count
        std = np.maximum(np.sqrt(np.maximum(squares / count - mean**2, 0.0)), 1e-6)
        return cls(
            image_size=features.image_size,
            mean=tuple(map(float, mean)),
            std=tuple(map(float, std)),
            class_names=tuple(features.class_names),
            image_column=features.image_column,
            label_column=features.label_column,
            max_value=features.max_value,
            codes=features.codes,
            channels=features.channels,
        )

    @property
    def model_inputs(self) -> ModelInputs:
        side = self.image_size
        if self.codes:
            return ModelInputs(
                shape=(side, side), data="images", dtype="int64", vocab_size=self.max_value + 1
            )
        return ModelInputs(shape=(self.channels, side, side), data="images")

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
        """Raw images (N, size, size, channels), or (N, size, size) of one channel, to
        (N, channels, size, size) float32 model input."""
        if images.ndim == 3 and self.channels == 1:
            images = images[..., None]
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"expected images of shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )
        mean, std = np.float32(self.mean), np.float32(self.std)
        x = (images.astype(np.float32) - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def raw_levels(self, inputs: np.ndarray) -> np.ndarray:
        """Model inputs (N, channels, size, size) back to the image values they came from,
        (N, size, size, channels), rounded and clipped to 0..max_value."""
        levels = inputs.transpose(0, 2, 3, 1)
        if not self.codes:
            levels = levels * np.float32(self.std) + np.float32(self.mean)
        return np.clip(np.round(levels), 0, self.max_value).astype(np.int64)

    def transform(self, batch):
        images = decode_images(
            batch[self.image_column], self.image_size, self.channels, self.image_column
        )
        if self.codes:  # uint8 here: a quarter of int64's object-store space
            maps = images[..., 0].astype(np.uint8)
            return {"inputs": maps, "target": maps}
        out = {"inputs": self.standardize(images)}
        if self.label_column in batch:
            out["target"] = np.asarray(batch[self.label_column]).astype(np.int64)
        return out

    def request_columns(self, instances):
        size = self.image_size
        images = []
        for i, instance in enumerate(instances):
            try:
                array = instance.to_array(self.channels)
            except (AttributeError, ValueError) as exc:
                reason = (
                    exc
                    if isinstance(exc, ValueError)
                    else "an image model needs exactly one of 'image' or 'image_base64'"
                )
                raise ValueError(f"instances.{i}: {reason}") from None
            if array.shape[:2] != (size, size):
                got = array.shape if self.channels > 1 else array.shape[:2]
                raise ValueError(
                    f"instances.{i}: expected a {shape_text(size, self.channels)} image, "
                    f"got {'x'.join(map(str, got))}"
                )
            if array.max(initial=0) > self.max_value:
                raise ValueError(f"instances.{i}: values must be 0 to {self.max_value}")
            images.append(array)
        return {self.image_column: np.stack(images)}

    def input_summary(self, inputs):
        """Wafer maps: the share of defective dies; pictures: the mean level (0-1) over
        every channel."""
        levels = self.raw_levels(inputs[:, None] if self.codes else inputs)
        levels = levels.reshape(len(levels), -1).astype(np.float64)
        if self.max_value == WAFER_MAX:
            return {"defect_fraction": (levels == DEFECT_CODE).mean(1)}
        return {"mean_intensity": levels.mean(1) / self.max_value}

    def describe(self) -> dict:
        return {
            "kind": "image-codes" if self.codes else "image",
            "height": self.image_size,
            "width": self.image_size,
            "channels": self.channels,
            "max_value": self.max_value,
        }

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, state: dict) -> ImagePreprocessor:
        fields = {k: v for k, v in state.items() if k != "kind"}
        return cls(
            **{
                **fields,
                "class_names": tuple(fields["class_names"]),
                "mean": tuple(fields["mean"]),
                "std": tuple(fields["std"]),
            }
        )
