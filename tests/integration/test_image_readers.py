"""Pictures from an image folder (class per sub-folder) and from NumPy arrays, through
`forgeml train` on the shared Ray runtime: grey levels 0-255, an unreadable file
rejected with its reason, and a package that classifies a PNG."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import torch
import yaml
from forgeml.cli import main
from forgeml.config import StorageConfig, config_from_dict
from forgeml.data.pipeline import prepare_data
from forgeml.data.sources import open_source
from forgeml.data.wafer import CLASS_NAMES, generate_map
from forgeml.model_package import load_model
from forgeml.serve.schemas import ImageInstance
from forgeml.storage import ModelRegistry, Storage
from PIL import Image

from tests.conftest import tiny_raw_config

CLASSES = CLASS_NAMES[:3]


def _pictures(per_class: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Wafer patterns drawn as 16x16 grey pictures (die codes 0, 1, 2 as 0, 127, 254)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    images = np.stack([generate_map(int(k), 16, rng) for k in labels]).astype(np.uint8) * 127
    return images, labels


def _image_folder(root) -> dict:
    images, labels = _pictures()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    (root / CLASSES[0] / "broken.png").write_bytes(b"not a png")
    return {"kind": "image_folder", "path": str(root), "image_size": 16}


def _numpy(root) -> dict:
    images, labels = _pictures()
    root.mkdir()
    np.savez(root / "a.npz", images=images[::2], labels=labels[::2])
    np.savez(root / "b.npz", images=images[1::2], labels=labels[1::2])
    (root / "c.npz").write_bytes(b"not an archive")
    return {"kind": "numpy", "path": str(root), "class_names": list(CLASSES)}


def test_numpy_arrays_go_through_the_pipeline_with_the_broken_file_aside(ray_runtime, tmp_path):
    """Only the reader differs from the image folder's (trained below): read, split,
    rejects written aside, preprocessing fitted on grey levels."""
    raw = tiny_raw_config(tmp_path / "store", name="arrays")
    raw["data"] = {"source": _numpy(tmp_path / "data"), "max_reject_fraction": 0.05}
    cfg = config_from_dict(raw)
    storage = Storage(cfg.storage)

    data = prepare_data(cfg, open_source(cfg, storage), str(tmp_path / "rejected"), storage.fs)

    assert sum(data.sizes.values()) == 60
    (reason,) = data.rejected
    assert reason == "images: not a .npz file with arrays 'images' and 'labels' (ValueError)"
    rejected = pd.read_parquet(tmp_path / "rejected")
    assert rejected["_raw"].str.endswith("c.npz").all()
    assert data.preprocessor.max_value == 255 and data.target.classes == CLASSES
    batch = data.train.take_batch(4)
    assert batch["inputs"].shape == (4, 1, 16, 16)


def test_an_image_folder_trains_and_the_package_classifies_a_png(ray_runtime, tmp_path):
    raw = tiny_raw_config(tmp_path / "store", name="pictures")
    raw["data"] = {"source": _image_folder(tmp_path / "data"), "max_reject_fraction": 0.05}
    raw["train"]["max_epochs"] = 1
    config = tmp_path / "pictures.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert main(["train", "--config", str(config)]) == 0

    package = tmp_path / "store" / "models" / "pictures" / "v1"
    metrics = json.loads((package / "metrics.json").read_text())
    assert metrics["data"]["rejected"] == {
        "image: not a readable image (UnidentifiedImageError)": 1
    }
    assert sum(metrics["data"]["rows"].values()) == 60
    preprocessor = json.loads((package / "preprocessor.json").read_text())
    assert preprocessor["max_value"] == 255 and 0 < preprocessor["mean"] < 255
    loaded = load_model(
        ModelRegistry(Storage(StorageConfig(root=str(tmp_path / "store")))), "pictures"
    )
    buffer = io.BytesIO()
    Image.fromarray(_pictures(1)[0][2]).save(buffer, format="PNG")
    png = ImageInstance(image_png_base64=base64.b64encode(buffer.getvalue()).decode())
    inputs = loaded.preprocessor.transform(loaded.preprocessor.request_columns([png]))["inputs"]
    with torch.no_grad():
        probabilities = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy()
    assert probabilities.shape == (1, 3)
    reference = json.loads((package / "reference.json").read_text())
    assert set(reference["input"]) == {"mean_intensity"}
