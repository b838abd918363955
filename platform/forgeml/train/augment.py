"""Random augmentation of image batches, drawn on the training worker itself: quarter-
turns and flips for images with no orientation, and for photos a random resized crop, a
left-right flip and colour jitter.

Augmenting in the loop, on the batch's device, needs no Ray Data stage of its own: no
CPUs beside the training workers' (a cluster whose CPUs the workers fill still trains),
and on a GPU it costs next to nothing. The draws come from a generator seeded with the
experiment's seed, the epoch and the rank, so a run repeats exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgeml.data.images import LUMA_FIXED

#: The weights of R, G and B in a grey level: the readers' (PIL's L mode), as fractions.
LUMA = tuple(float(weight) / 2**16 for weight in LUMA_FIXED)


def augment(
    images: list[torch.Tensor], rotate90: bool, flip: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """Random quarter-turns and flips per sample of square images (N, ..., H, W). Every
    tensor of ``images`` gets the same ones: an input and the target drawn from it."""
    n, device = len(images[0]), images[0].device
    none = torch.zeros(n, dtype=torch.bool, device=device)
    turns = (
        torch.randint(0, 4, (n,), generator=generator, device=device)
        if rotate90
        else torch.zeros(n, dtype=torch.long, device=device)
    )
    horizontal = torch.rand(n, generator=generator, device=device) < 0.5 if flip else none
    vertical = torch.rand(n, generator=generator, device=device) < 0.5 if flip else none
    out = []
    for tensor in images:
        tensor = tensor.clone()
        for k in (1, 2, 3):
            chosen = turns == k
            tensor[chosen] = torch.rot90(tensor[chosen], k, dims=(-2, -1))
        tensor[horizontal] = tensor[horizontal].flip(-1)
        tensor[vertical] = tensor[vertical].flip(-2)
        out.append(tensor)
    return out


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def crop_and_flip(
    images: torch.Tensor, crop_scale: float | None, horizontal_flip: bool, generator
) -> torch.Tensor:
    """Float images (N, C, H, W), each a random square crop of at least ``crop_scale`` of
    its area resized back to H x W (bilinear), and/or mirrored left-right at random."""
    n, device = len(images), images.device
    mirrored = torch.rand(n, generator=generator, device=device) < 0.5
    mirrored &= horizontal_flip
    if crop_scale is None:
        images = images.clone()
        images[mirrored] = images[mirrored].flip(-1)
        return images
    side = _uniform(n, crop_scale, 1.0, generator, device).sqrt()  # of the image's side
    # The crop's centre, in the (-1, 1) coordinates of affine_grid, keeps it inside.
    centre_x = _uniform(n, -1.0, 1.0, generator, device) * (1 - side)
    centre_y = _uniform(n, -1.0, 1.0, generator, device) * (1 - side)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(mirrored, -side, side)
    theta[:, 1, 1] = side
    theta[:, 0, 2], theta[:, 1, 2] = centre_x, centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_colours(
    images: torch.Tensor, strength: float, mean, std, max_value: int, generator
) -> torch.Tensor:
    """Standardised images (N, C, H, W) whose values, back on their own scale, are scaled
    by a random brightness factor, pulled to or from the image's mean level (contrast)
    and, for RGB, to or from each pixel's grey level (saturation), each factor drawn from
    1 +- ``strength`` per image; clipped to 0..max_value and standardised again."""
    n, channels, device = len(images), images.shape[1], images.device
    shape = (1, channels, 1, 1)
    mean = torch.tensor(mean, dtype=images.dtype, device=device).view(shape)
    std = torch.tensor(std, dtype=images.dtype, device=device).view(shape)
    levels = images * std + mean

    def factor() -> torch.Tensor:
        return _uniform(n, 1 - strength, 1 + strength, generator, device).view(n, 1, 1, 1)

    def grey(values: torch.Tensor) -> torch.Tensor:
        if channels != 3:
            return values
        weights = torch.tensor(LUMA, dtype=values.dtype, device=device).view(1, 3, 1, 1)
        return (values * weights).sum(1, keepdim=True)

    levels = levels * factor()
    average = grey(levels).mean((1, 2, 3), keepdim=True)
    levels = (levels - average) * factor() + average
    if channels == 3:
        pixel_grey = grey(levels)
        levels = (levels - pixel_grey) * factor() + pixel_grey
    return (levels.clamp(0, max_value) - mean) / std


def augment_batch(
    inputs: torch.Tensor,
    target: torch.Tensor,
    rotate90: bool,
    flip: bool,
    generator,
    horizontal_flip: bool = False,
    crop_scale: float | None = None,
    color_jitter: float = 0.0,
    levels: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images augmented alike: its inputs, and its target when that is the
    image too (generative models reconstruct their input; they take turns and flips
    only); labels stay as they are. ``levels`` (the preprocessor's per-channel ``mean``
    and ``std`` and ``max_value``) is what colour jitter needs."""
    if target.ndim >= 3:
        inputs, target = augment([inputs, target], rotate90, flip, generator)
        return inputs, target
    if rotate90 or flip:
        (inputs,) = augment([inputs], rotate90, flip, generator)
    if horizontal_flip or crop_scale is not None:
        inputs = crop_and_flip(inputs, crop_scale, horizontal_flip, generator)
    if color_jitter:
        inputs = jitter_colours(inputs, color_jitter, **levels, generator=generator)
    return inputs, target
