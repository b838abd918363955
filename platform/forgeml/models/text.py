"""Sequence models over token ids (0 is padding): a Transformer encoder and an RNN.

Both pool the hidden states of the real tokens only (mean over the mask), so padding
never changes a prediction.
"""

from __future__ import annotations

import torch
from torch import nn

from forgeml.config import RNNConfig, TransformerConfig
from forgeml.data.preprocessing import ModelInputs
from forgeml.models import register_model


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (N, L, D) hidden states over the positions where the (N, L) mask is set."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TransformerClassifier(nn.Module):
    def __init__(self, cfg: TransformerConfig, inputs: ModelInputs, num_outputs: int):
        super().__init__()
        self.tokens = nn.Embedding(inputs.vocab_size, cfg.d_model, padding_idx=0)
        self.positions = nn.Embedding(inputs.shape[0], cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.heads,
            cfg.feedforward,
            cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, num_outputs))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.tokens(ids) + self.positions(positions)
        hidden = self.encoder(hidden, src_key_padding_mask=~mask)
        return self.head(masked_mean(self.norm(hidden), mask))


class RNNClassifier(nn.Module):
    def __init__(self, cfg: RNNConfig, inputs: ModelInputs, num_outputs: int):
        super().__init__()
        self.tokens = nn.Embedding(inputs.vocab_size, cfg.embedding_dim, padding_idx=0)
        self.dropout = nn.Dropout(cfg.dropout)
        cell = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnn = cell(
            cfg.embedding_dim,
            cfg.hidden,
            num_layers=cfg.layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        width = cfg.hidden * (2 if cfg.bidirectional else 1)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(self.tokens(ids)), lengths, batch_first=True, enforce_sorted=False
        )
        output, _ = self.rnn(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(
            output, batch_first=True, total_length=ids.shape[1]
        )
        return self.head(self.dropout(masked_mean(hidden, mask)))


def _token_inputs(kind: str, inputs: ModelInputs) -> None:
    if inputs.dtype != "int64" or not inputs.vocab_size or len(inputs.shape) != 1:
        raise ValueError(f"model {kind} needs token ids (text features), got {inputs}")


@register_model("transformer")
def build_transformer(cfg: TransformerConfig, inputs: ModelInputs, num_outputs: int):
    _token_inputs("transformer", inputs)
    return TransformerClassifier(cfg, inputs, num_outputs)


@register_model("rnn")
def build_rnn(cfg: RNNConfig, inputs: ModelInputs, num_outputs: int):
    _token_inputs("rnn", inputs)
    return RNNClassifier(cfg, inputs, num_outputs)
