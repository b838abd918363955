"""The generative wafer examples on the shared Ray runtime: a tiny classifier trained
first as the judge, then the VAE and the DCGAN configs on a subset for two epochs
through the public entry point, their packages (with samples.png and the judge's
ratings), and `forgeml generate` drawing maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from forgeml.cli import main
from PIL import Image

from tests.conftest import PACKAGE_FILES, REPO, tiny_raw_config, write_config

SUBSET = (
    "data.source.samples_per_class=30",
    "data.source.image_size=16",
    "model.width=4",
    "model.depth=2",
    "model.latent_dim=4",
    "task.samples=40",
    "task.judge.model=tiny-wafer",
    "train.max_epochs=2",
    "train.batch_size=32",
    "scaling.torch_threads=1",
)


@pytest.fixture(scope="module")
def judged_store(ray_runtime, tmp_path_factory):
    """A storage root holding a registered 16x16 wafer classifier, tiny-wafer."""
    root = tmp_path_factory.mktemp("generative")
    config = write_config(root / "judge.yaml", tiny_raw_config(root / "store"))
    assert main(["train", "--config", str(config)]) == 0
    return root / "store"


def train_example(name: str, store, *overrides: str) -> int:
    args = ["train", "--config", str(REPO / "examples" / "wafer_generative" / name)]
    for override in (f"storage.root={store}", *SUBSET, *overrides):
        args += ["--set", override]
    return main(args)


def check_judged_package(package, samples: int) -> dict:
    assert PACKAGE_FILES | {"samples.png"} <= {p.name for p in package.iterdir()}
    grid = Image.open(package / "samples.png")
    assert grid.format == "PNG" and len(np.unique(np.asarray(grid).reshape(-1, 3), axis=0)) > 2
    metrics = json.loads((package / "metrics.json").read_text())
    test = metrics["test"]
    judge = test["judge"]
    assert judge["model"] == "tiny-wafer:v1"
    assert judge["generated"]["maps"] == samples
    assert judge["test_maps"]["maps"] == metrics["data"]["rows"]["test"]
    for rated in (judge["generated"], judge["test_maps"]):
        assert sum(rated["class_share"].values()) == pytest.approx(1.0)
        assert 0 <= rated["confident_defect_share"] <= rated["confident_share"] <= 1
    assert test["judged_defect_share"] == judge["generated"]["confident_defect_share"]
    assert 0 <= test["judged_class_distance"] <= 1
    card = (package / "MODEL_CARD.md").read_text()
    assert "16x16 images like those of `image`" in card and "samples.png" in card
    return metrics


def test_vae_example_trains_on_a_subset_rates_and_draws(judged_store, tmp_path, capsys):
    assert train_example("vae.yaml", judged_store) == 0

    metrics = check_judged_package(judged_store / "models" / "wafer-vae" / "v1", samples=40)
    test = metrics["test"]
    assert test["elbo"] < 0 and test["kl"] >= 0 and 0 <= test["reconstruction_error"] <= 1
    assert test["elbo"] == pytest.approx(-(test["reconstruction_nll"] + test["kl"]), rel=1e-4)
    assert "val_reconstruction_error" in metrics["history"][-1]

    capsys.readouterr()
    generate = ["generate", "--model", "wafer-vae", "--storage-root", str(judged_store)]
    assert main([*generate, "--samples", "6", "--output", str(tmp_path / "maps.npz")]) == 0
    images = np.load(tmp_path / "maps.npz")["images"]
    assert images.shape == (6, 16, 16) and images.max() <= 2
    assert main([*generate, "--output", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size == ((16 * 4 + 4) * 8 + 4,) * 2
    assert "wrote 64 images" in capsys.readouterr().out
    assert main(generate) == 2
    assert "give --output FILE.png (a grid) or FILE.npz" in capsys.readouterr().err
    assert main([*generate, "--output", "x.png", "--prompt", "a wafer"]) == 2
    assert "a vae model draws images; it takes no --prompt" in capsys.readouterr().err


def test_dcgan_example_trains_every_epoch_and_keeps_the_last(judged_store):
    assert train_example("dcgan.yaml", judged_store) == 0

    metrics = check_judged_package(judged_store / "models" / "wafer-dcgan" / "v1", samples=40)
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert metrics["best_epoch"] == 2 and metrics["status"] == "completed"
    assert 0 <= metrics["test"]["discriminator_accuracy"] <= 1


def test_a_wrong_judge_fails_before_training(judged_store, capsys):
    capsys.readouterr()
    assert train_example("vae.yaml", judged_store, "task.judge.model=missing-model") == 2
    assert "task.judge.model: no registered model named 'missing-model'" in (
        capsys.readouterr().err
    )
    assert train_example("vae.yaml", judged_store, "data.source.image_size=32") == 2
    assert "tiny-wafer:v1 reads 16x16 images of values 0-2; this experiment draws 32x32" in (
        capsys.readouterr().err
    )
    assert train_example("dcgan.yaml", judged_store, "task.judge.no_defect_class=clean") == 2
    assert "'clean' is not a class of tiny-wafer:v1" in capsys.readouterr().err
