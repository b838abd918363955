"""Wafer maps unlike the training ones, and newly labelled maps to retrain on: what the
drift tests serve or record, and what an alarm's retraining appends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from forgeml.data.wafer import CLASS_NAMES, DEFECT, GOOD, generate, generate_map


def drifted_maps(n: int, seed: int) -> np.ndarray:
    """Edge-ring maps only, from a noisier line: 15% of their good dies failed at random."""
    rng = np.random.default_rng(seed)
    edge_ring = CLASS_NAMES.index("edge-ring")
    maps = np.stack([generate_map(edge_ring, 16, rng) for _ in range(n)])
    maps[(maps == GOOD) & (rng.random(maps.shape) < 0.15)] = DEFECT
    return maps


def appended_maps(folder: Path) -> Path:
    """Newly labelled maps in the wafer source's own layout, for the retraining."""
    rows = generate(samples_per_class=10, size=16, seed=99, first_id=1_000_000)
    table = pa.table(
        {
            "sample_id": rows["sample_id"],
            "image": pa.array([image.tobytes() for image in rows["image"]], pa.binary()),
            "label": rows["label"],
        }
    )
    folder.mkdir()
    pq.write_table(table, folder / "new-maps.parquet")
    return folder
