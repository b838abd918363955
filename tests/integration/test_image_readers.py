"""Pictures from NumPy arrays (grey levels 0-255) and from an image folder (class per
sub-folder, colour photos of several file kinds), through `forgeml train` on the shared
Ray runtime: an unreadable file rejected with its reason, per-channel standardisation,
photo augmentation, and a package that classifies RGB arrays, PNG and JPEG files."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from forgeml.cli import main
from forgeml.config import StorageConfig, config_from_dict
from forgeml.data.images import to_channels
from forgeml.data.pipeline import prepare_data
from forgeml.data.sources import open_source
from forgeml.data.wafer import CLASS_NAMES, generate_map
from forgeml.model_package import load_model
from forgeml.serve.schemas import ImageInstance
from forgeml.storage import ModelRegistry, Storage
from PIL import Image

from tests.conftest import tiny_raw_config
from tests.photos import ISOLUMINANT, coloured_shapes, photo_folder

CLASSES = CLASS_NAMES[:3]


def _pictures(per_class: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Wafer patterns drawn as 16x16 grey pictures (die codes 0, 1, 2 as 0, 127, 254)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    images = np.stack([generate_map(int(k), 16, rng) for k in labels]).astype(np.uint8) * 127
    return images, labels


def _numpy(root) -> dict:
    images, labels = _pictures()
    root.mkdir()
    first = images[::2].astype(np.int16)
    first[3, 0, 0] = 300  # not a grey level: that image is rejected, the file's others read
    np.savez(root / "a.npz", images=first, labels=labels[::2])
    np.savez(root / "b.npz", images=images[1::2], labels=labels[1::2])
    (root / "c.npz").write_bytes(b"not an archive")
    return {"kind": "numpy", "path": str(root), "class_names": list(CLASSES)}


def test_numpy_arrays_go_through_the_pipeline_with_the_broken_file_aside(ray_runtime, tmp_path):
    """Only the reader differs from the image folder's (trained below): read, split,
    rejects written aside, preprocessing fitted on grey levels. A file's rejected image
    and its good ones share a block: the good ones are kept, none lost."""
    raw = tiny_raw_config(tmp_path / "store", name="arrays")
    raw["data"] = {"source": _numpy(tmp_path / "data"), "max_reject_fraction": 0.05}
    cfg = config_from_dict(raw)
    storage = Storage(cfg.storage)

    data = prepare_data(cfg, open_source(cfg, storage), str(tmp_path / "rejected"), storage.fs)

    assert sum(data.sizes.values()) == 59
    assert data.rejected == {
        "images: not a .npz file with arrays 'images' and 'labels' (ValueError)": 1,
        "images: values outside 0 to 255": 1,
    }
    rejected = pd.read_parquet(tmp_path / "rejected")
    assert sorted(rejected["_raw"].str.rpartition("/")[2]) == ["a.npz:3", "c.npz"]
    assert data.preprocessor.max_value == 255 and data.target.classes == CLASSES
    batch = data.train.take_batch(4)
    assert batch["inputs"].shape == (4, 1, 16, 16)


def _encoded(image: np.ndarray, fmt: str) -> ImageInstance:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=95)
    return ImageInstance(image_base64=base64.b64encode(buffer.getvalue()).decode())


def test_colour_photos_train_on_their_colour_and_the_package_classifies_rgb_files(
    ray_runtime, tmp_path
):
    """The three colours look the same in grey, so only a model that reads R, G and B
    can tell the classes apart (chance: a third). Trained with a random resized crop,
    left-right flips and colour jitter."""
    images, _ = coloured_shapes(1)
    assert len({int(v) for v in to_channels(images, 1)[:, 12, 12, 0]}) <= 2
    raw = tiny_raw_config(tmp_path / "store", name="photos")
    raw["data"] = {
        "source": photo_folder(tmp_path / "data"),
        "max_reject_fraction": 0.05,
        "augment": {"crop_scale": 0.6, "horizontal_flip": True, "color_jitter": 0.1},
    }
    raw["model"]["width"] = 8
    raw["train"] |= {"max_epochs": 4, "optimizer": {"lr": 0.01}}
    config = tmp_path / "photos.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert main(["train", "--config", str(config)]) == 0

    package = tmp_path / "store" / "models" / "photos" / "v1"
    metrics = json.loads((package / "metrics.json").read_text())
    assert metrics["data"]["rejected"] == {
        "image: not a readable image (UnidentifiedImageError)": 1
    }
    assert sum(metrics["data"]["rows"].values()) == 180 and metrics["data"]["augmented"]
    assert metrics["test"]["accuracy"] >= 0.8, metrics["test"]
    preprocessor = json.loads((package / "preprocessor.json").read_text())
    assert preprocessor["channels"] == 3 and len(preprocessor["mean"]) == 3
    assert len({round(mean, 3) for mean in preprocessor["mean"]}) == 3  # one per channel
    loaded = load_model(
        ModelRegistry(Storage(StorageConfig(root=str(tmp_path / "store")))), "photos"
    )
    assert loaded.preprocessor.model_inputs.shape == (3, 16, 16)
    pictures, labels = coloured_shapes(4, seed=1)
    small = np.stack([np.asarray(Image.fromarray(p).resize((16, 16))) for p in pictures])
    instances = [
        *(ImageInstance(image=p.tolist()) for p in small[:4]),
        *(_encoded(p, "PNG") for p in pictures[4:8]),
        *(_encoded(p, "JPEG") for p in pictures[8:]),
    ]
    instances[4] = ImageInstance(image=small[4].tolist())
    with pytest.raises(ValueError, match="instances.5: expected a 16x16x3 image, got 24x24x3"):
        loaded.preprocessor.request_columns(instances)
    columns = loaded.preprocessor.request_columns(
        [ImageInstance(image=p.tolist()) for p in small] + [_encoded(small[0], "JPEG")]
    )
    inputs = loaded.preprocessor.transform(columns)["inputs"]
    with torch.no_grad():
        predicted = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy().argmax(1)
    classes = [loaded.task.class_names.index(list(ISOLUMINANT)[k]) for k in labels]
    assert (predicted[:-1] == classes).mean() >= 0.75 and predicted[-1] == predicted[0]
    reference = json.loads((package / "reference.json").read_text())
    assert set(reference["input"]) == {"mean_intensity"}
