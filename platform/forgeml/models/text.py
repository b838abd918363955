"""Sequence models over token ids (0 is padding).

The classifiers (a Transformer encoder and an RNN) pool the hidden states of the real
tokens only (the mean, or for the RNN optionally the maximum, over the mask), so
padding never changes a prediction. The causal
Transformer is a language model: texts are padded at the end, and every position
attends only to the ones before it, so padding never reaches a real token either. The
sequence-to-sequence Transformer encodes the source (padding masked out) and decodes
causally, like the language model, while attending to the encoded source.
"""

from __future__ import annotations

import torch
from torch import nn

from forgeml.config import (
    BagOfNgramsConfig,
    CausalTransformerConfig,
    RNNConfig,
    Seq2SeqTransformerConfig,
    TransformerConfig,
)
from forgeml.data.base import ModelInputs
from forgeml.models import register_model
from forgeml.models.blocks import encoder, recurrent


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (N, L, D) hidden states over the positions where the (N, L) mask is set."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def masked_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Largest value of each of D units of (N, L, D) hidden states over the positions
    where the (N, L) mask is set (0 for a row without any)."""
    masked = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    return torch.where(mask.any(1, keepdim=True), masked, torch.zeros_like(masked))


#: The multiplier of the rolling hash that numbers a run of neighbouring tokens.
NGRAM_HASH = 1_000_003


class BagOfNgrams(nn.Module):
    """fastText's classifier: the mean embedding of a text's tokens and of its runs of 2
    to ``ngrams`` neighbouring tokens (each hashed into one of ``buckets`` embeddings of
    their own), then a linear layer. Runs that reach into padding are padding too, so a
    text's prediction does not depend on its padding; tokens keep an embedding layer of
    their own (``tokens``)."""

    def __init__(self, cfg: BagOfNgramsConfig, inputs: ModelInputs, num_outputs: int):
        super().__init__()
        self.ngrams, self.buckets = cfg.ngrams, cfg.buckets
        self.tokens = nn.Embedding(inputs.vocab_size, cfg.embedding_dim, padding_idx=0)
        self.runs = nn.Embedding(cfg.buckets + 1, cfg.embedding_dim, padding_idx=0)
        for embedding in (self.tokens, self.runs):  # fastText's: the mean starts near zero
            nn.init.uniform_(embedding.weight, -1 / cfg.embedding_dim, 1 / cfg.embedding_dim)
            with torch.no_grad():
                embedding.weight[0].zero_()
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.embedding_dim, num_outputs)

    def run_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids to the ids of their runs of 2 to ``ngrams`` tokens, 1 to
        ``buckets`` (0 where a run reaches into padding)."""
        parts, hashed, real = [], ids, ids != 0
        for n in range(2, self.ngrams + 1):
            hashed = (hashed[:, :-1] * NGRAM_HASH + ids[:, n - 1 :]) % self.buckets
            real = real[:, :-1] & (ids[:, n - 1 :] != 0)
            parts.append(torch.where(real, hashed + 1, 0))
        return torch.cat(parts, 1) if parts else ids[:, :0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        runs = self.run_ids(ids)
        hidden = torch.cat([self.tokens(ids), self.runs(runs)], 1)
        mask = torch.cat([ids != 0, runs != 0], 1)
        return self.head(self.dropout(masked_mean(hidden, mask)))


class TransformerClassifier(nn.Module):
    def __init__(self, cfg: TransformerConfig, inputs: ModelInputs, num_outputs: int):
        super().__init__()
        self.tokens = nn.Embedding(inputs.vocab_size, cfg.d_model, padding_idx=0)
        self.positions = nn.Embedding(inputs.shape[0], cfg.d_model)
        self.encoder = encoder(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, num_outputs))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """A text without tokens (all padding) gets the head's bias, not NaN: it attends
        to its first position only so that its attention has something to weigh, and
        the mean over its tokens is zero. Explaining a text takes tokens away, down to
        none."""
        mask = ids != 0
        attended = mask.clone()
        attended[:, 0] |= ~mask.any(1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.tokens(ids) + self.positions(positions)
        hidden = self.encoder(hidden, src_key_padding_mask=~attended)
        return self.head(masked_mean(self.norm(hidden), mask))


class RNNClassifier(nn.Module):
    def __init__(self, cfg: RNNConfig, inputs: ModelInputs, num_outputs: int):
        super().__init__()
        self.tokens = nn.Embedding(inputs.vocab_size, cfg.embedding_dim, padding_idx=0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.rnn = recurrent(cfg)
        width = cfg.hidden * (2 if cfg.bidirectional else 1)
        self.head = nn.Linear(width, num_outputs)
        self.pool = masked_max if cfg.pooling == "max" else masked_mean

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Reads each text's tokens in order, padding left out wherever it is: a token
        an explanation takes away leaves padding between two real ones."""
        ids = ids.gather(1, torch.sort((ids == 0).to(torch.uint8), dim=1, stable=True).indices)
        mask = ids != 0
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(self.tokens(ids)), lengths, batch_first=True, enforce_sorted=False
        )
        output, _ = self.rnn(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(
            output, batch_first=True, total_length=ids.shape[1]
        )
        return self.head(self.dropout(self.pool(hidden, mask)))


class CausalTransformer(nn.Module):
    """Next-token logits at every position; the output layer is the token embedding."""

    def __init__(self, cfg: CausalTransformerConfig, inputs: ModelInputs):
        super().__init__()
        self.context = inputs.shape[0]
        self.tokens = small_embedding(inputs.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(self.context, cfg.d_model)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        self.decoder = encoder(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        positions = torch.arange(length, device=ids.device)
        hidden = self.dropout(self.tokens(ids) + self.positions(positions))
        hidden = self.decoder(hidden, mask=causal, is_causal=True)
        return self.norm(hidden) @ self.tokens.weight.T


def small_embedding(vocab_size: int, width: int) -> nn.Embedding:
    """A token embedding for a tied output layer, initialised N(0, 0.02) as GPT-2 does:
    the default N(0, 1) starts the logits at a standard deviation of sqrt(width)."""
    embedding = nn.Embedding(vocab_size, width, padding_idx=0)
    nn.init.normal_(embedding.weight, std=0.02)
    with torch.no_grad():
        embedding.weight[0].zero_()
    return embedding


class Seq2SeqTransformer(nn.Module):
    """Next-token logits of the target at every decoder position, given the source.

    Reads (N, 2, L) token ids: the source, and the decoder's input ([BOS] and the
    target so far). The encoder and decoder share the token embedding and the output
    layer."""

    def __init__(self, cfg: Seq2SeqTransformerConfig, inputs: ModelInputs):
        super().__init__()
        length = inputs.shape[1]
        self.tokens = small_embedding(inputs.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(length, cfg.d_model)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        decoder_layer = nn.TransformerDecoderLayer(
            cfg.d_model, cfg.heads, cfg.feedforward, cfg.dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.Transformer(
            cfg.d_model,
            cfg.heads,
            custom_encoder=encoder(cfg, norm=nn.LayerNorm(cfg.d_model)),
            custom_decoder=nn.TransformerDecoder(
                decoder_layer, cfg.layers, norm=nn.LayerNorm(cfg.d_model)
            ),
            batch_first=True,
        )

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(positions))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        source, decoder_input = pairs[:, 0], pairs[:, 1]
        length = decoder_input.shape[1]
        padding = source == 0
        hidden = self.transformer(
            self._embed(source),
            self._embed(decoder_input),
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(length, device=pairs.device),
            src_key_padding_mask=padding,
            memory_key_padding_mask=padding,
            tgt_is_causal=True,
        )
        return hidden @ self.tokens.weight.T


@register_model("transformer", data="text")
def build_transformer(cfg: TransformerConfig, inputs: ModelInputs, num_outputs: int):
    return TransformerClassifier(cfg, inputs, num_outputs)


@register_model("rnn", data="text")
def build_rnn(cfg: RNNConfig, inputs: ModelInputs, num_outputs: int):
    return RNNClassifier(cfg, inputs, num_outputs)


@register_model("bag_of_ngrams")
def build_bag_of_ngrams(cfg: BagOfNgramsConfig, inputs: ModelInputs, num_outputs: int):
    return BagOfNgrams(cfg, inputs, num_outputs)


@register_model("causal_transformer")
def build_causal_transformer(cfg: CausalTransformerConfig, inputs: ModelInputs, num_outputs: int):
    if num_outputs != inputs.vocab_size:
        raise ValueError(
            f"model causal_transformer predicts the next token: {num_outputs} outputs for a "
            f"vocabulary of {inputs.vocab_size}"
        )
    return CausalTransformer(cfg, inputs)


@register_model("seq2seq_transformer")
def build_seq2seq_transformer(
    cfg: Seq2SeqTransformerConfig, inputs: ModelInputs, num_outputs: int
) -> Seq2SeqTransformer:
    return Seq2SeqTransformer(cfg, inputs)
