"""Augmentation on the training worker: only turns and flips, the same for an image
target as for its input, labels untouched, and the same draws for the same seed."""

import torch
from forgeml.train.augment import augment, augment_batch
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
