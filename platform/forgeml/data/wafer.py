"""A seeded generator of wafer maps modelled on WM-811K's nine failure-pattern classes.

Each map is a square uint8 grid with WM-811K's encoding: 0 outside the wafer, 1 a good
die, 2 a defective die. Every map varies the things that vary on real wafers: the
wafer's radius and centre, the background failure rate, the pattern's position,
size, rotation, and the defect density inside it.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = (
    "none",
    "center",
    "donut",
    "edge-loc",
    "edge-ring",
    "loc",
    "near-full",
    "random",
    "scratch",
)

OUTSIDE, GOOD, DEFECT = 0, 1, 2


def _geometry(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wafer mask plus each die's radius (0 centre, 1 edge) and angle, for a jittered wafer."""
    radius = size / 2 * rng.uniform(0.88, 0.98)
    cy, cx = (size - 1) / 2 + rng.uniform(-0.6, 0.6, size=2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = y - cy, x - cx
    r = np.sqrt(dx**2 + dy**2) / radius
    theta = np.arctan2(dy, dx)
    return r <= 1.0, r, theta


def _blob(r, theta, rng, center_r: float, size: float) -> np.ndarray:
    """A soft-edged elliptic blob at polar position (center_r, random angle)."""
    angle = rng.uniform(-np.pi, np.pi)
    px, py = center_r * np.cos(angle), center_r * np.sin(angle)
    x, y = r * np.cos(theta), r * np.sin(theta)
    rot = rng.uniform(0, np.pi)
    u = (x - px) * np.cos(rot) + (y - py) * np.sin(rot)
    v = -(x - px) * np.sin(rot) + (y - py) * np.cos(rot)
    aspect = rng.uniform(0.7, 1.4)
    return (u / (size * aspect)) ** 2 + (v * aspect / size) ** 2 <= 1.0


def _arc(theta, rng, span: float) -> np.ndarray:
    """Dies whose angle lies within an arc of the given span (radians) at a random start."""
    start = rng.uniform(-np.pi, np.pi)
    return np.mod(theta - start, 2 * np.pi) <= span


def _scratch(r, theta, rng) -> np.ndarray:
    """A thin, slightly curved line crossing part of the wafer."""
    x, y = r * np.cos(theta), r * np.sin(theta)
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.5, 0.5)
    along = x * np.cos(angle) + y * np.sin(angle)
    across = -x * np.sin(angle) + y * np.cos(angle) - offset
    curvature = rng.uniform(-0.4, 0.4)
    across = across - curvature * along**2
    length = rng.uniform(0.6, 1.4)
    start = rng.uniform(-1.0, 1.0 - length / 2)
    width = rng.uniform(0.035, 0.06)
    return (np.abs(across) <= width) & (along >= start) & (along <= start + length)


def _pattern(label: str, r, theta, rng) -> tuple[np.ndarray, float]:
    """Region where the pattern's defects fall, and their density inside it."""
    if label == "none":
        return np.zeros_like(r, dtype=bool), 0.0
    if label == "center":
        return _blob(r, theta, rng, rng.uniform(0, 0.12), rng.uniform(0.2, 0.38)), rng.uniform(
            0.6, 0.95
        )
    if label == "donut":
        inner = rng.uniform(0.25, 0.45)
        ring = (r >= inner) & (r <= inner + rng.uniform(0.18, 0.3))
        return ring, rng.uniform(0.55, 0.9)
    if label == "edge-loc":
        band = r >= rng.uniform(0.72, 0.85)
        return band & _arc(theta, rng, rng.uniform(0.35, 1.4)), rng.uniform(0.6, 0.95)
    if label == "edge-ring":
        band = r >= rng.uniform(0.8, 0.9)
        return band & _arc(theta, rng, rng.uniform(1.6 * np.pi, 2 * np.pi)), rng.uniform(0.6, 0.95)
    if label == "loc":
        return _blob(r, theta, rng, rng.uniform(0.3, 0.6), rng.uniform(0.12, 0.25)), rng.uniform(
            0.6, 0.95
        )
    if label == "near-full":
        return r <= 1.0, rng.uniform(0.8, 0.97)
    if label == "random":
        return r <= 1.0, rng.uniform(0.2, 0.45)
    if label == "scratch":
        return _scratch(r, theta, rng), rng.uniform(0.75, 1.0)
    raise KeyError(f"unknown wafer pattern {label!r}; expected one of {CLASS_NAMES}")


def generate_map(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One wafer map of the given class index, as a (size, size) uint8 array."""
    inside, r, theta = _geometry(size, rng)
    region, density = _pattern(CLASS_NAMES[label], r, theta, rng)
    background = rng.uniform(0.0, 0.05)
    failed = (rng.random(r.shape) < background) | (region & (rng.random(r.shape) < density))
    wafer = np.where(inside, GOOD, OUTSIDE).astype(np.uint8)
    wafer[inside & failed] = DEFECT
    return wafer


def generate(
    samples_per_class: int, size: int, seed: int, first_id: int = 0
) -> dict[str, np.ndarray]:
    """A class-balanced, shuffled batch of maps: ``sample_id``, ``image`` (N, size*size), ``label``.

    The same (samples_per_class, size, seed) always gives the same rows.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASS_NAMES)), samples_per_class)
    rng.shuffle(labels)
    images = np.stack([generate_map(int(k), size, rng).reshape(-1) for k in labels])
    ids = np.arange(first_id, first_id + len(labels), dtype=np.int64)
    return {"sample_id": ids, "image": images, "label": labels.astype(np.int64)}
