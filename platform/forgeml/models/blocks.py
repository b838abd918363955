"""Building blocks the model families share."""

from __future__ import annotations

from torch import nn

from forgeml.config import RNNConfig, TransformerConfig


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


def recurrent(cfg: RNNConfig) -> nn.LSTM | nn.GRU:
    """The configured LSTM or GRU over ``cfg.embedding_dim``-wide steps (batch first)."""
    cell = nn.LSTM if cfg.cell == "lstm" else nn.GRU
    return cell(
        cfg.embedding_dim,
        cfg.hidden,
        num_layers=cfg.layers,
        batch_first=True,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout if cfg.layers > 1 else 0.0,
    )
