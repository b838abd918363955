"""Generative models of images whose pixel values are categories (wafer die codes 0-2).

Both read an image as a one-hot map, (N, categories, H, W), and write per-pixel
category logits; both draw new images with ``draw(count, generator)``. Each stride-2
level halves the image side, so the side must divide by ``2**depth``.

* ``ConvVAE``: encoder to a Gaussian latent code, decoder back to logits. The forward
  pass returns ``(logits, mu, logvar)``, from which the ``vae`` task computes the ELBO.
* ``DCGAN``: generator from Gaussian noise, discriminator over one-hot maps. The
  forward pass returns the discriminator's logits for real maps, for generated ones
  as its own loss sees them, and for generated ones as the generator's loss sees them
  (through a frozen copy of the discriminator's weights, so that one backward pass
  gives each player only its own gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from forgeml.config import ConvVAEConfig, DCGANConfig
from forgeml.data.base import ModelInputs
from forgeml.models import register_model


def one_hot_maps(codes: torch.Tensor, categories: int) -> torch.Tensor:
    """(N, H, W) integer codes as (N, categories, H, W) floats."""
    return F.one_hot(codes.long(), categories).permute(0, 3, 1, 2).float()


def sample_categories(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One category per pixel of (N, categories, H, W) logits, drawn from their softmax
    (Gumbel-max), as (N, H, W) int64 codes."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0)))
    return (logits.float() + gumbel).argmax(1)


def _down(in_channels: int, out_channels: int, norm: bool) -> list[nn.Module]:
    layers = [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return [*layers, nn.LeakyReLU(0.2, inplace=True)]


def _up(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _widths(width: int, depth: int) -> list[int]:
    return [width * 2**level for level in range(depth)]


def _encoder(categories: int, widths: list[int]) -> nn.Sequential:
    """Strided convs from one-hot maps down to the coarsest level, BN after the first."""
    layers, channels = [], categories
    for level, width in enumerate(widths):
        layers += _down(channels, width, norm=level > 0)
        channels = width
    return nn.Sequential(*layers)


def _decoder(categories: int, widths: list[int], side: int, latent_dim: int) -> nn.Sequential:
    """From a latent vector up to (N, categories, H, W) logits, widest level first."""
    top = widths[-1]
    layers: list[nn.Module] = [
        nn.Linear(latent_dim, top * side * side, bias=False),
        nn.Unflatten(1, (top, side, side)),
        nn.BatchNorm2d(top),
        nn.ReLU(inplace=True),
    ]
    for wider, narrower in zip(widths[:0:-1], widths[-2::-1], strict=True):
        layers += _up(wider, narrower)
    layers.append(nn.ConvTranspose2d(widths[0], categories, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


class ConvVAE(nn.Module):
    def __init__(self, cfg: ConvVAEConfig, size: int, categories: int):
        super().__init__()
        widths, side = _widths(cfg.width, cfg.depth), size // 2**cfg.depth
        self.categories, self.latent_dim, self.size = categories, cfg.latent_dim, size
        self.encoder = nn.Sequential(_encoder(categories, widths), nn.Flatten())
        self.to_latent = nn.Linear(widths[-1] * side * side, 2 * cfg.latent_dim)
        self.decoder = _decoder(categories, widths, side, cfg.latent_dim)

    def forward(self, codes: torch.Tensor):
        """Logits of the reconstruction from one sampled latent code, and the code's
        posterior mean and log-variance."""
        mu, logvar = self.to_latent(self.encoder(one_hot_maps(codes, self.categories))).chunk(2, 1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar

    @torch.no_grad()
    def draw(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """New images: latent codes from the prior, pixels drawn from the decoder."""
        device = next(self.parameters()).device
        z = torch.randn(count, self.latent_dim, generator=generator, device=device)
        return sample_categories(self.decoder(z), generator)


class DCGAN(nn.Module):
    def __init__(self, cfg: DCGANConfig, size: int, categories: int):
        super().__init__()
        widths, side = _widths(cfg.width, cfg.depth), size // 2**cfg.depth
        self.categories, self.latent_dim = categories, cfg.latent_dim
        self.generator = _decoder(categories, widths, side, cfg.latent_dim)
        self.discriminator = nn.Sequential(
            _encoder(categories, widths), nn.Flatten(), nn.Linear(widths[-1] * side * side, 1)
        )

    def generate(self, noise: torch.Tensor) -> torch.Tensor:
        """One-hot maps drawn from the generator's per-pixel distribution; gradients
        pass straight through to its logits (Gumbel-softmax, hard)."""
        return F.gumbel_softmax(self.generator(noise).float(), tau=1.0, hard=True, dim=1)

    def forward(self, codes: torch.Tensor):
        """Discriminator logits (N, 1): real maps, generated maps with the generator
        held fixed, and generated maps with the discriminator held fixed."""
        real = one_hot_maps(codes, self.categories)
        fake = self.generate(torch.randn(len(codes), self.latent_dim, device=codes.device))
        # The generator's view: weights that take no gradient, and copies of the batch-norm
        # statistics, which the discriminator's own passes keep.
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        frozen |= {name: b.clone() for name, b in self.discriminator.named_buffers()}
        return (
            self.discriminator(real),
            self.discriminator(fake.detach()),
            functional_call(self.discriminator, frozen, (fake,)),
        )

    @torch.no_grad()
    def draw(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        noise = torch.randn(count, self.latent_dim, generator=generator, device=device)
        return sample_categories(self.generator(noise), generator)


def _image_side(kind: str, depth: int, inputs: ModelInputs) -> int:
    """The side of the square code maps a generative model reads; ValueError otherwise."""
    if len(inputs.shape) != 2 or inputs.shape[0] != inputs.shape[1] or not inputs.vocab_size:
        raise ValueError(f"model {kind} needs square maps of category codes, got {inputs}")
    side = inputs.shape[0]
    if side % 2**depth:
        raise ValueError(
            f"model.depth={depth} halves the {side}x{side} image {depth} times, so its side "
            f"must divide by {2**depth}; lower model.depth or change the image size"
        )
    return side


@register_model("conv_vae")
def build_conv_vae(cfg: ConvVAEConfig, inputs: ModelInputs, num_outputs: int) -> ConvVAE:
    return ConvVAE(cfg, _image_side(cfg.kind, cfg.depth, inputs), inputs.vocab_size)


@register_model("dcgan")
def build_dcgan(cfg: DCGANConfig, inputs: ModelInputs, num_outputs: int) -> DCGAN:
    return DCGAN(cfg, _image_side(cfg.kind, cfg.depth, inputs), inputs.vocab_size)
