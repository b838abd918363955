"""Augmentation on the training worker: turns and flips, the same for an image target as
for its input, labels untouched, and the same draws for the same seed; photo crops,
left-right flips and colour jitter that keep values on their scale."""

import pytest
import torch
from forgeml.train.augment import augment, augment_batch, crop_and_flip, jitter_colours
from forgeml.train.loop import augmentation_generator


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augmentation_only_rotates_and_flips():
    images = torch.rand((64, 1, 8, 8), generator=_generator(1))
    (out,) = augment([images], rotate90=True, flip=True, generator=_generator())
    assert not torch.equal(out, images)
    for original, changed in zip(images, out, strict=True):
        variants = [torch.rot90(original, k, dims=(1, 2)) for k in range(4)]
        variants += [v.flip(-1) for v in variants]
        assert any(torch.equal(changed, v) for v in variants)
    assert torch.equal(augment([images], False, False, _generator())[0], images)


def test_an_image_target_turns_with_its_input_and_labels_stay():
    """Generative models reconstruct their input: both must get the same transform."""
    codes = torch.randint(0, 3, (64, 8, 8), dtype=torch.uint8, generator=_generator(2))
    inputs, target = augment_batch(codes, codes.clone(), True, True, _generator())
    assert not torch.equal(inputs, codes)
    assert torch.equal(inputs, target)
    labels = torch.arange(64)
    turned, kept = augment_batch(codes[:, None].float(), labels, True, True, _generator())
    assert not torch.equal(turned, codes[:, None].float())
    assert torch.equal(kept, labels)


def test_the_draws_follow_the_seed_epoch_and_rank():
    images = torch.rand((32, 1, 6, 6), generator=_generator(3))

    def drawn(seed, epoch, rank):
        generator = augmentation_generator(seed, epoch, rank, torch.device("cpu"))
        return augment([images], True, True, generator)[0]

    assert torch.equal(drawn(7, 1, 0), drawn(7, 1, 0))
    assert not torch.equal(drawn(7, 1, 0), drawn(7, 2, 0))
    assert not torch.equal(drawn(7, 1, 0), drawn(7, 1, 1))


def test_a_left_right_flip_alone_mirrors_without_resampling():
    images = torch.rand((64, 3, 5, 5), generator=_generator(4))
    out = crop_and_flip(images, None, True, _generator())
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 54


def test_a_resized_crop_shows_part_of_the_image_at_full_size():
    """On a horizontal ramp a crop of a share a of the area spans at least sqrt(a) of the
    ramp, in order (or reversed when mirrored), and never leaves the image's values."""
    ramp = torch.linspace(0, 1, 32).expand(16, 3, 32, 32).contiguous()
    out = crop_and_flip(ramp, 0.25, True, _generator())
    assert out.shape == ramp.shape and not torch.equal(out, ramp)
    rows = out[:, 0, 16]
    spans = rows.max(1).values - rows.min(1).values
    assert (spans >= 0.5 * (1 - 1 / 32) - 1e-4).all() and (spans <= 1 + 1e-6).all()
    steps = rows.diff(dim=1)
    assert ((steps >= -1e-6).all(1) | (steps <= 1e-6).all(1)).all()
    constant = torch.full((4, 1, 8, 8), 0.3)
    assert torch.allclose(crop_and_flip(constant, 0.1, False, _generator()), constant)


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_jitter_stays_on_the_scale_of_the_values(channels):
    mean, std = (120.0,) * channels, (60.0,) * channels
    levels = torch.randint(0, 256, (32, channels, 6, 6), generator=_generator(5)).float()
    standardised = (levels - 120.0) / 60.0
    unchanged = jitter_colours(standardised, 0.0, mean, std, 255, _generator())
    assert torch.allclose(unchanged, standardised, atol=1e-5)
    jittered = jitter_colours(standardised, 0.4, mean, std, 255, _generator()) * 60.0 + 120.0
    assert jittered.min() >= -1e-3 and jittered.max() <= 255 + 1e-3
    assert not torch.allclose(jittered, levels, atol=1)


def test_saturation_jitter_keeps_a_grey_pixel_grey():
    grey = torch.full((8, 3, 4, 4), 100.0)
    out = jitter_colours((grey - 100) / 50, 0.5, (100.0,) * 3, (50.0,) * 3, 255, _generator())
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5)
    assert torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_photo_augmentation_is_drawn_per_batch_and_leaves_labels():
    images = torch.rand((16, 3, 8, 8), generator=_generator(6))
    labels = torch.arange(16)
    settings = {
        "rotate90": False,
        "flip": False,
        "horizontal_flip": True,
        "crop_scale": 0.5,
        "color_jitter": 0.2,
        "levels": {"mean": (0.5,) * 3, "std": (0.25,) * 3, "max_value": 1},
    }
    first = augment_batch(images, labels, generator=_generator(), **settings)
    again = augment_batch(images, labels, generator=_generator(), **settings)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], labels)
    assert not torch.allclose(first[0], images)
