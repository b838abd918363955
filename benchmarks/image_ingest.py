"""Image ingest: training batches from a folder of image files, forgeml against a DataLoader.

A folder of generated PNG and JPEG files (three classes, ``--files`` in all, 96x96 RGB)
becomes augmented batches of 64x64 RGB images, ``--epochs`` times over:

- forgeml: the ``image_folder`` source on Ray Data (files decoded and resized once into
  the run's dataset, split, standardised), then each epoch the training split's batches
  as a training worker reads them (``iter_torch_batches``), augmented on the worker
  (random resized crop, left-right flip, colour jitter: ``augment_batch``); from the
  local folder, and from the same files on an S3 server (moto) on 127.0.0.1;
- baseline: what torchvision's ``ImageFolder`` with a ``DataLoader`` does, written out
  (torchvision's wheels on PyPI do not install beside the CPU build of PyTorch used
  here): a file list per class folder, each file opened with PIL, converted to RGB,
  resized (bilinear) and standardised with the same per-channel moments in the loader's
  worker processes (``--workers``, as many as cores), shuffled batches of the same size,
  augmented by the same function. It decodes every file every epoch.

Samples a second: the rows each epoch delivers over its wall-clock time; forgeml's first
epoch includes preparing the dataset (reading and decoding every file). Prints one JSON
object.

    python benchmarks/image_ingest.py [--files 3000] [--epochs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CLASSES = ("bars", "disc", "noise")
SIZE, SOURCE_SIZE, BATCH = 64, 96, 64
AUGMENT = {"horizontal_flip": True, "crop_scale": 0.5, "color_jitter": 0.2}


def write_images(folder: Path, files: int) -> None:
    """``files`` images, a third per class, alternately PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grid = np.mgrid[:SOURCE_SIZE, :SOURCE_SIZE]
    for i in range(files):
        label = CLASSES[i % 3]
        base = rng.integers(0, 256, 3)
        if label == "bars":
            mask = (grid[1] // 8) % 2 == 0
        elif label == "disc":
            mask = ((grid - SOURCE_SIZE / 2) ** 2).sum(0) < rng.uniform(200, 1500)
        else:
            mask = rng.random((SOURCE_SIZE, SOURCE_SIZE)) < 0.5
        pixels = np.where(mask[..., None], base, 255 - base).astype(np.uint8)
        (folder / label).mkdir(exist_ok=True)
        extension = "png" if i % 2 else "jpg"
        Image.fromarray(pixels).save(folder / label / f"{i:05d}.{extension}")


class FolderImages(torch.utils.data.Dataset):
    """ImageFolder's reading: (path, class) pairs, PIL decode, RGB, resize, standardise."""

    def __init__(self, folder: Path, mean: np.ndarray, std: np.ndarray):
        self.items = [
            (path, index)
            for index, name in enumerate(CLASSES)
            for path in sorted((folder / name).iterdir())
        ]
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        pixels = (np.asarray(resized, dtype=np.float32) - self.mean) / self.std
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), label


def _epochs(batches, epochs: int, augment_settings: dict, first_extra_s: float = 0.0) -> list:
    """Samples a second of each epoch over ``batches()`` (a fresh pass per call), every
    batch augmented; ``first_extra_s`` is added to the first epoch (data preparation)."""
    from forgeml.train.augment import augment_batch

    rates = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch)
        started, rows = time.perf_counter(), 0
        for inputs, target in batches():
            augment_batch(inputs, target, generator=generator, **augment_settings)
            rows += len(inputs)
        seconds = time.perf_counter() - started + (first_extra_s if epoch == 0 else 0.0)
        rates.append(
            {"rows": rows, "seconds": round(seconds, 2), "samples_per_s": round(rows / seconds, 1)}
        )
    return rates


def forgeml_epochs(path: str, storage: dict, epochs: int) -> dict:
    """Prepare the ``image_folder`` dataset at ``path``, then read its training split."""
    from forgeml import runtime
    from forgeml.config import config_from_dict
    from forgeml.launch import prepare_launch
    from forgeml.tasks import batch_dtypes, build_task

    cfg = config_from_dict(
        {
            "name": "ingest",
            "storage": storage,
            "data": {
                "source": {"kind": "image_folder", "path": path, "image_size": SIZE, "channels": 3},
                "augment": AUGMENT,
            },
            "model": {"kind": "cnn"},
            "scaling": {"num_workers": 1},
        }
    )
    runtime.connect()  # Ray's start is not ingest
    started = time.perf_counter()
    data = prepare_launch(cfg, "runs", cfg.name, False).data
    prepared_s = time.perf_counter() - started
    task = build_task(cfg.task, data.training_target(cfg.task))
    dtypes = batch_dtypes(task, data.preprocessor.model_inputs)

    def batches():
        for batch in data.train.iter_torch_batches(
            batch_size=BATCH, dtypes=dtypes, local_shuffle_buffer_size=4 * BATCH
        ):
            yield batch["inputs"], batch["target"]

    settings = data.augment_settings()
    return {
        "prepare_s": round(prepared_s, 2),
        "epochs": _epochs(batches, epochs, settings, first_extra_s=prepared_s),
        "levels": settings["levels"],
    }


def dataloader_epochs(folder: Path, levels: dict, workers: int, epochs: int) -> dict:
    mean, std = (np.asarray(levels[k], np.float32).reshape(-1) for k in ("mean", "std"))
    loader = torch.utils.data.DataLoader(
        FolderImages(folder, mean, std),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    settings = {"rotate90": False, "flip": False, **AUGMENT, "levels": levels}
    return {"epochs": _epochs(lambda: iter(loader), epochs, settings)}


def _moto(folder: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on 127.0.0.1 holding ``folder`` under s3://images/."""
    import boto3
    from forgeml.runtime import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 30
    while True:
        try:
            s3.create_bucket(Bucket="images")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    for path in folder.rglob("*.*"):
        s3.upload_file(str(path), "images", f"folder/{path.relative_to(folder)}")
    return server, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "images"
        folder.mkdir()
        write_images(folder, args.files)
        local = forgeml_epochs(str(folder), {"root": f"{work}/store"}, args.epochs)
        baseline = dataloader_epochs(folder, local.pop("levels"), args.workers, args.epochs)
        server, endpoint = _moto(folder)
        try:
            storage = {"root": "s3://images/store", "endpoint_url": endpoint}
            s3 = forgeml_epochs("s3://images/folder", storage, args.epochs)
            s3.pop("levels")
        finally:
            server.terminate()

    def ratio(side: dict, epoch: int) -> float:
        ours = side["epochs"][epoch]["samples_per_s"]
        return round(ours / baseline["epochs"][epoch]["samples_per_s"], 2)

    print(
        json.dumps(
            {
                "benchmark": "image_ingest",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "files": args.files,
                "image": f"{SOURCE_SIZE}px RGB PNG/JPEG -> {SIZE}px, batch {BATCH}",
                "dataloader_workers": args.workers,
                "forgeml_local": local,
                "forgeml_s3": s3,
                "dataloader": baseline,
                "ratio_forgeml_local_to_dataloader": [ratio(local, e) for e in range(args.epochs)],
                "ratio_forgeml_s3_to_dataloader": [ratio(s3, e) for e in range(args.epochs)],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
