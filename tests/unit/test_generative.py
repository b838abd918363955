"""Generative image models and tasks: shapes, the losses' arithmetic, the GAN's split
gradients, rating by a judge, sample grids, and the config rules."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from forgeml.config import (
    ConfigError,
    ConvVAEConfig,
    DCGANConfig,
    GANTask,
    JudgeConfig,
    VAETask,
    config_from_dict,
)
from forgeml.data.base import ModelInputs, TargetSpec
from forgeml.data.images import ImageFeatures, ImagePreprocessor
from forgeml.data.wafer import CLASS_NAMES, generate
from forgeml.models import build_model
from forgeml.models.generative import one_hot_maps
from forgeml.tasks import build_task
from forgeml.tasks.generative import WAFER_COLOURS, Judge, map_grid_png
from PIL import Image

from tests.conftest import tiny_raw_config


def generative_raw_config(**sections) -> dict:
    """The tiny wafer config with some sections replaced (a model's fields differ by kind)."""
    model = sections.pop("model", None)
    raw = tiny_raw_config("/tmp", **sections)
    if model is not None:
        raw["model"] = model
    return raw


CODES = ModelInputs(shape=(16, 16), data="images", dtype="int64", vocab_size=3)
TARGET = TargetSpec(classes=CLASS_NAMES, name="image", vocab_size=3)


def wafer_codes(per_class: int = 2, size: int = 16) -> torch.Tensor:
    rows = generate(per_class, size, seed=3)
    return torch.from_numpy(rows["image"].reshape(-1, size, size).astype(np.int64))


def test_vae_reconstructs_and_draws_codes():
    model = build_model(ConvVAEConfig(latent_dim=4, width=4, depth=2), CODES, 3)
    codes = wafer_codes()
    logits, mu, logvar = model(codes)
    assert logits.shape == (len(codes), 3, 16, 16) and mu.shape == logvar.shape == (len(codes), 4)
    drawn = model.draw(5, torch.Generator().manual_seed(0))
    assert drawn.shape == (5, 16, 16) and drawn.dtype == torch.int64
    assert set(drawn.unique().tolist()) <= {0, 1, 2}
    again = model.draw(5, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_vae_loss_is_the_negative_elbo_per_image():
    task = build_task(VAETask(), TARGET)
    codes = torch.tensor([[[0, 1], [2, 1]]])
    logits = torch.randn(1, 3, 2, 2)
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.3]])
    nll = -sum(
        torch.log_softmax(logits[0, :, i, j], 0)[codes[0, i, j]] for i in range(2) for j in range(2)
    )
    kl = sum(
        0.5 * (m**2 + math.exp(v) - 1 - v) for m, v in zip([0.5, -1.0], [0.2, -0.3], strict=True)
    )
    assert task.loss((logits, mu, logvar), codes).item() == pytest.approx(float(nll) + kl, rel=1e-5)
    metrics = task.test_metrics()
    metrics.update(task.predict((logits, mu, logvar)), codes)
    report = task.report(metrics.compute())
    assert report["elbo"] == pytest.approx(-(float(nll) + kl), rel=1e-5)
    assert report["bits_per_pixel"] == pytest.approx(
        (float(nll) + kl) / (4 * math.log(2)), rel=1e-5
    )
    wrong = (logits.argmax(1) != codes).float().mean().item()
    assert report["reconstruction_error"] == pytest.approx(wrong)


def test_gan_step_gives_each_player_only_its_own_gradient():
    """One backward pass of the summed loss must equal the discriminator's gradient of
    its own loss and the generator's gradient of its own, as alternating steps use."""
    torch.manual_seed(0)
    model = build_model(DCGANConfig(latent_dim=8, width=4, depth=2), CODES, 3)
    task = build_task(GANTask(), TARGET)
    codes = wafer_codes()

    torch.manual_seed(1)
    task.loss(model(codes), codes).backward()
    combined = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    bce = F.binary_cross_entropy_with_logits
    torch.manual_seed(1)
    real = one_hot_maps(codes, 3)
    fake = model.generate(torch.randn(len(codes), 8))
    d_real, d_fake = model.discriminator(real), model.discriminator(fake.detach())
    d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
    d_grads = torch.autograd.grad(d_loss, list(model.discriminator.parameters()))
    d_gen = model.discriminator(fake)
    g_grads = torch.autograd.grad(
        bce(d_gen, torch.ones_like(d_gen)), list(model.generator.parameters())
    )
    for (name, _), grad in zip(model.discriminator.named_parameters(), d_grads, strict=True):
        torch.testing.assert_close(combined[f"discriminator.{name}"], grad)
    for (name, _), grad in zip(model.generator.named_parameters(), g_grads, strict=True):
        torch.testing.assert_close(combined[f"generator.{name}"], grad)


def test_gan_draws_codes_and_scores_the_discriminator():
    model = build_model(DCGANConfig(latent_dim=8, width=4, depth=2), CODES, 3)
    assert model.draw(7).shape == (7, 16, 16)
    task = build_task(GANTask(), TARGET)
    metrics = task.validation_metrics()
    real = torch.tensor([[2.0], [-1.0]])  # one real map taken for real, one not
    fake = torch.tensor([[-3.0], [-0.5]])  # both generated maps caught
    metrics.update(task.predict((real, fake, fake)), torch.zeros(2, 16, 16))
    assert float(metrics.compute()["discriminator_accuracy"]) == pytest.approx(0.75)


@pytest.mark.parametrize("config", [ConvVAEConfig(depth=3), DCGANConfig(depth=3)])
def test_generative_model_needs_a_side_that_halves_evenly(config):
    with pytest.raises(ValueError, match="model.depth=3 halves the 20x20 image"):
        build_model(
            config, ModelInputs(shape=(20, 20), data="images", dtype="int64", vocab_size=3), 3
        )


class FixedLogits(torch.nn.Module):
    """A stand-in classifier whose logits per map are given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, inputs):
        return self.logits[: len(inputs)]


def test_judge_counts_confident_defects_and_class_shares():
    task = build_task(
        config_from_dict(tiny_raw_config("/tmp")).task, TargetSpec(classes=("none", "a", "b"))
    )
    preprocessor = ImagePreprocessor(4, (1.0,), (1.0,), ("none", "a", "b"))
    logits = [[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 9.0]]
    judge = Judge("j:v1", JudgeConfig(model="j"), FixedLogits(logits), preprocessor, task)
    rated = judge.rate(np.zeros((4, 4, 4), np.uint8))
    # Confident: maps 0 (a), 1 (none), 3 (b); defect and confident: maps 0 and 3.
    assert rated["confident_defect_share"] == 0.5
    assert rated["confident_share"] == 0.75
    assert rated["class_share"] == {"none": 0.25, "a": 0.5, "b": 0.25}


def test_sample_grid_shows_every_map_in_die_colours():
    maps = np.zeros((10, 4, 4), np.uint8)
    maps[3, 1, 2] = 2
    maps[9] = 1
    image = np.asarray(Image.open(io.BytesIO(map_grid_png(maps, 2, columns=4, scale=2))))
    gap, cell = 2, 4 * 2 + 2
    assert image.shape == (3 * cell + gap, 4 * cell + gap, 3)
    np.testing.assert_array_equal(image[gap + 1 * 2, cell * 3 + gap + 2 * 2], WAFER_COLOURS[2])
    np.testing.assert_array_equal(image[2 * cell + gap, cell + gap], WAFER_COLOURS[1])
    np.testing.assert_array_equal(image[gap, gap], WAFER_COLOURS[0])


def test_code_preprocessor_keeps_values_and_targets_the_image():
    features = ImageFeatures("sample_id", "image", "label", 16, CLASS_NAMES, codes=True)
    preprocessor = ImagePreprocessor.from_moments(features, 10, np.array([10.0]), np.array([14.0]))
    rows = generate(1, 16, seed=0)
    out = preprocessor.transform({"image": rows["image"], "label": rows["label"]})
    codes = rows["image"].reshape(-1, 16, 16)
    np.testing.assert_array_equal(out["inputs"], codes)
    np.testing.assert_array_equal(out["target"], codes)
    assert preprocessor.model_inputs == CODES and preprocessor.target.vocab_size == 3
    standardised = ImagePreprocessor.from_moments(
        ImageFeatures("sample_id", "image", "label", 16, CLASS_NAMES),
        10,
        np.array([10.0]),
        np.array([14.0]),
    )
    np.testing.assert_allclose(
        preprocessor.input_summary(out["inputs"])["defect_fraction"],
        standardised.input_summary(standardised.transform({"image": rows["image"]})["inputs"])[
            "defect_fraction"
        ],
    )


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"task": {"kind": "vae"}}, "task vae on an image source needs model conv_vae"),
        ({"model": {"kind": "dcgan"}}, "dcgan is made for task gan"),
        (
            {
                "task": {"kind": "gan"},
                "model": {"kind": "dcgan"},
                "data": {
                    "source": {"kind": "table", "path": "x.csv"},
                    "features": {"kind": "tabular", "target": "y", "numeric": ["x"]},
                },
            },
            "task: gan needs an image source",
        ),
        (
            {"task": {"kind": "vae"}, "model": {"kind": "conv_vae"}, "tune": {"metric": "epoch"}},
            "tune.metric",
        ),
        ({"train": {"optimizer": {"betas": [0.5, 1.0]}}}, "betas must each be in"),
        (
            {"task": {"kind": "vae"}, "model": {"kind": "conv_vae", "depth": 5}},
            "image_size must divide by 32",
        ),
        (
            {"train": {"early_stopping": {"metric": "epoch", "mode": "min"}}},
            "metric epoch keeps the last epoch: it needs mode max",
        ),
        (
            {
                "train": {
                    "early_stopping": {"metric": "epoch", "mode": "max"},
                    "schedule": {"kind": "plateau"},
                }
            },
            "plateau lowers the rate",
        ),
        (
            {"task": {"kind": "gan"}, "model": {"kind": "dcgan"}, "train": {"grad_clip_norm": 1}},
            "clipping the generator's and the discriminator's gradients together",
        ),
        (
            {
                "task": {"kind": "vae"},
                "model": {"kind": "conv_vae"},
                "data": {
                    "source": {"kind": "image_folder", "path": "photos", "channels": 3},
                },
            },
            "data.source.channels: task vae draws single-channel images",
        ),
        (
            {
                "task": {"kind": "vae"},
                "model": {"kind": "conv_vae"},
                "data": {"augment": {"crop_scale": 0.5}},
            },
            "data.augment.crop_scale: task vae reads image values as categories",
        ),
    ],
)
def test_generative_configs_that_do_not_fit_are_refused(sections, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(generative_raw_config(**sections))


def test_gan_keeps_its_last_epoch_and_unclipped_gradients_by_default():
    raw = generative_raw_config(task={"kind": "gan"}, model={"kind": "dcgan"})
    del raw["train"]["early_stopping"]
    cfg = config_from_dict(raw)
    stopping = cfg.train.early_stopping
    assert (stopping.metric, stopping.mode, cfg.train.grad_clip_norm) == ("epoch", "max", None)
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg  # the package's config reloads
    chosen = config_from_dict(
        generative_raw_config(
            task={"kind": "gan"},
            model={"kind": "dcgan"},
            train={"early_stopping": {"metric": "val_discriminator_accuracy", "mode": "min"}},
        )
    )
    assert chosen.train.early_stopping.metric == "val_discriminator_accuracy"


def test_gan_may_keep_its_last_epoch():
    cfg = config_from_dict(
        generative_raw_config(
            task={"kind": "gan", "judge": {"model": "wafer-cnn"}},
            model={"kind": "dcgan"},
            train={"early_stopping": {"metric": "epoch", "mode": "max"}},
        )
    )
    assert cfg.train.early_stopping.metric == "epoch"
    assert cfg.task.judge.min_confidence == 0.9


def test_maps_with_values_beyond_the_codes_are_rejected():
    """A category model one-hot encodes values: a grey-level map must not reach it."""
    features = ImageFeatures("sample_id", "image", "label", 2, ("a", "b"), codes=True)
    batch = {
        "sample_id": np.arange(3),
        "image": np.array([bytes([0, 1, 2, 1]), bytes([0, 1, 200, 1]), bytes([0, 0, 0])], object),
        "label": np.array([0, 1, 1]),
    }
    assert features.reject_reasons(batch).tolist() == [
        "",
        "image: values must be 0 to 2",
        "image: expected 2x2 values per row",
    ]


def test_generative_models_take_maps_without_a_valid_label():
    """Most real WM-811K maps carry no label; a model that ignores labels keeps them."""
    batch = {
        "sample_id": np.arange(2),
        "image": np.array([bytes([0, 1, 2, 1]), bytes([1, 1, 1, 1])], object),
        "label": np.array([np.nan, 7.0]),
    }
    codes = ImageFeatures("sample_id", "image", "label", 2, ("a", "b"), codes=True)
    assert codes.reject_reasons(batch).tolist() == ["", ""]
    classes = ImageFeatures("sample_id", "image", "label", 2, ("a", "b"))
    assert classes.reject_reasons(batch).tolist() == ["label: not a class index 0..1"] * 2
