"""Random quarter-turns and flips of image batches, drawn on the training worker itself.

Augmenting in the loop, on the batch's device, needs no Ray Data stage of its own: no
CPUs beside the training workers' (a cluster whose CPUs the workers fill still trains),
and on a GPU it costs next to nothing. The draws come from a generator seeded with the
experiment's seed, the epoch and the rank, so a run repeats exactly.
"""

from __future__ import annotations

import torch


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


def augment_batch(
    inputs: torch.Tensor, target: torch.Tensor, rotate90: bool, flip: bool, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images turned alike: its inputs, and its target when that is the image
    too (generative models reconstruct their input); labels stay as they are."""
    if target.ndim >= 3:
        inputs, target = augment([inputs, target], rotate90, flip, generator)
        return inputs, target
    (inputs,) = augment([inputs], rotate90, flip, generator)
    return inputs, target
