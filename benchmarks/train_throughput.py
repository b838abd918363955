"""Steady-state training throughput: forgeml's Ray Train path against a plain PyTorch loop.

Both train the same wafer CNN on the same training split with the same batch size
(per worker), optimizer, augmentation and total torch thread count; throughput counts
training samples per second of the training phase of each epoch, after the first
(warm-up) epoch.
Prints one JSON object.

    python benchmarks/train_throughput.py [--epochs 6] [--workers 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from forgeml import runtime
from forgeml.config import config_from_dict
from forgeml.data.base import ModelInputs
from forgeml.data.pipeline import prepare_data
from forgeml.data.sources import open_source
from forgeml.models import build_model
from forgeml.storage import Storage
from forgeml.tasks import build_task
from forgeml.train.augment import augment
from forgeml.train.optim import LRSchedule, build_optimizer
from forgeml.train.trainer import run_training


def experiment(root: str, epochs: int, workers: int, threads: int, samples_per_class: int):
    return config_from_dict(
        {
            "name": "bench-wafer",
            "storage": {"root": root},
            "data": {
                "source": {"kind": "wafer", "samples_per_class": samples_per_class},
                "augment": {"rotate90": True, "flip": True},
            },
            "model": {"kind": "cnn", "width": 16, "depth": 3, "dropout": 0.2},
            "train": {
                "max_epochs": epochs,
                "batch_size": 128,
                "early_stopping": {"enabled": False},
            },
            "scaling": {"num_workers": workers, "cpus_per_worker": 1, "torch_threads": threads},
        }
    )


def plain_pytorch(cfg, images: np.ndarray, labels: np.ndarray, target) -> list[float]:
    """The loop a user would write by hand over in-memory arrays; samples/s per epoch.

    It gets all the threads the Ray workers get together, so both use the same cores.
    """
    torch.set_num_threads(cfg.scaling.torch_threads * cfg.scaling.num_workers)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, target)
    model = build_model(
        cfg.model, ModelInputs(shape=images.shape[1:], data="images"), task.num_outputs
    )
    optimizer = build_optimizer(cfg.train.optimizer, model.parameters())
    steps = int(np.ceil(len(images) / cfg.train.batch_size))
    schedule = LRSchedule(cfg.train.schedule, optimizer, steps, cfg.train.max_epochs, "min")
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    throughput = []
    for _ in range(cfg.train.max_epochs):
        model.train()
        started = time.perf_counter()
        order = rng.permutation(len(images))
        for start in range(0, len(order), cfg.train.batch_size):
            index = order[start : start + cfg.train.batch_size]
            (x,) = augment([torch.from_numpy(images[index])], True, True, generator)
            y = torch.from_numpy(labels[index])
            loss = task.loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
            optimizer.step()
            schedule.after_step()
        throughput.append(len(images) / (time.perf_counter() - started))
    return throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (per worker)")
    parser.add_argument("--samples-per-class", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        cfg = experiment(root, args.epochs, args.workers, args.threads, args.samples_per_class)
        with runtime.environment(runtime.RAY_ENV_DEFAULTS):  # the runtime forgeml starts
            runtime.start_embedded_runtime(num_cpus=max(2, args.workers + 1))
        runtime.connect()  # forgeml's Ray Data settings, before the data is prepared
        storage = Storage(cfg.storage)
        rejects = storage.path("benchmark-rejected")
        data = prepare_data(cfg, open_source(cfg, storage), rejects, storage.fs)
        arrays = data.train.take_batch(data.sizes["train"], batch_format="numpy")
        plain = plain_pytorch(cfg, arrays["inputs"], arrays["target"], data.target)

        outcome = run_training(cfg)
        ours = [h["samples_per_s"] for h in outcome.metrics["history"]]
        runtime.shutdown()

    steady_plain = statistics.median(plain[1:])
    steady_ours = statistics.median(ours[1:])
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "torch": torch.__version__,
                "workers": args.workers,
                "torch_threads_per_worker": args.threads,
                "batch_size": cfg.train.batch_size,
                "train_rows": data.sizes["train"],
                "epochs": args.epochs,
                "plain_pytorch_samples_per_s": round(steady_plain, 1),
                "forgeml_ray_train_samples_per_s": round(steady_ours, 1),
                "ratio": round(steady_ours / steady_plain, 3),
                "per_epoch": {
                    "plain": [round(v) for v in plain],
                    "forgeml": [round(v) for v in ours],
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
