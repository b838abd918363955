"""Building blocks the model families share."""

from __future__ import annotations

from torch import nn

from forgeml.config import TransformerConfig


def encoder_layer(cfg: TransformerConfig) -> nn.TransformerEncoderLayer:
    """One pre-norm (more stable to train from scratch) batch-first encoder layer."""
    return nn.TransformerEncoderLayer(
        cfg.d_model, cfg.heads, cfg.feedforward, cfg.dropout, batch_first=True, norm_first=True
    )


def encoder(cfg: TransformerConfig, norm: nn.Module | None = None) -> nn.TransformerEncoder:
    """``cfg.layers`` pre-norm encoder layers (nested tensors do not apply to pre-norm)."""
    return nn.TransformerEncoder(
        encoder_layer(cfg), cfg.layers, norm=norm, enable_nested_tensor=False
    )
