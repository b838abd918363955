"""Fitted preprocessing for wafer maps, shared by training, evaluation and serving.

The state (normalisation statistics, image size) is fitted on the training split only
and stored as ``preprocessor.json`` in the model package, so serving applies exactly
what training applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def splitmix64(values: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash (SplitMix64 finaliser), vectorised over uint64."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


SPLITS = ("train", "val", "test")


def assign_split(ids: np.ndarray, seed: int, val_fraction: float, test_fraction: float):
    """Split name per row id, a pure function of (id, seed): stable under any partitioning."""
    with np.errstate(over="ignore"):
        hashed = splitmix64(ids.astype(np.uint64) ^ splitmix64(np.array([seed], np.uint64)))
    u = (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(
        u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train")
    )


def decode_images(column, image_size: int, name: str = "image") -> np.ndarray:
    """An image column (flat or nested, any list layout) as a (N, size, size) uint8 array."""
    images = np.stack(column) if column.dtype == object else np.asarray(column)
    if images.size != len(images) * image_size * image_size:
        raise ValueError(
            f"column {name!r}: expected {image_size}x{image_size} values per row, "
            f"got {images.size // max(len(images), 1)}"
        )
    return images.reshape(len(images), image_size, image_size)


@dataclass(frozen=True)
class WaferPreprocessor:
    """Scales die codes (0 outside, 1 good, 2 defect) and standardises them."""

    image_size: int
    mean: float
    std: float

    kind: str = "wafer-standardize"

    @classmethod
    def from_moments(cls, image_size: int, count: float, total: float, total_sq: float):
        """Fit from the pixel count, sum and sum of squares of the training images."""
        mean = total / count
        std = max(float(np.sqrt(max(total_sq / count - mean**2, 0.0))), 1e-6)
        return cls(image_size=image_size, mean=float(mean), std=std)

    def transform(self, images: np.ndarray) -> np.ndarray:
        """(N, size, size) raw maps to (N, 1, size, size) float32 model input."""
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected maps of shape (N, {self.image_size}, {self.image_size}), "
                f"got {tuple(images.shape)}"
            )
        x = (images.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        return x[:, None, :, :]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> WaferPreprocessor:
        return cls(**state)


def augment(images: np.ndarray, rotate90: bool, flip: bool, rng: np.random.Generator):
    """Random quarter-turns and flips of (N, C, H, W) square images, per sample."""
    out = images.copy()
    if rotate90:
        turns = rng.integers(0, 4, len(out))
        for k in (1, 2, 3):
            chosen = turns == k
            out[chosen] = np.rot90(out[chosen], k, axes=(2, 3))
    if flip:
        horizontal = rng.random(len(out)) < 0.5
        out[horizontal] = out[horizontal][..., ::-1]
        vertical = rng.random(len(out)) < 0.5
        out[vertical] = out[vertical][..., ::-1, :]
    return out
