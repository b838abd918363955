"""Language modelling: predict every next token of a text; perplexity; sampling.

The target of a row is its input shifted by one token, padded with 0, which the loss and
the metrics skip. Perplexity is exp of the mean cross-entropy per real target token
([EOS] included, [BOS] never a target).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from forgeml.config import LanguageModelTask as LanguageModelConfig
from forgeml.data.base import TargetSpec
from forgeml.tasks import register_task

if TYPE_CHECKING:
    import torchmetrics

PAD_ID = 0


@register_task("language_model")
class LanguageModelTask:
    target_dtype = torch.int64
    #: Rows per evaluation batch: outputs are (rows, tokens, vocabulary) floats.
    evaluation_batch_size = 32
    headline_metrics = ()  # no simple baseline draws or writes text

    def __init__(self, cfg: LanguageModelConfig, target: TargetSpec):
        self.cfg = cfg
        self.num_outputs = target.vocab_size
        self.criterion = nn.CrossEntropyLoss(ignore_index=PAD_ID)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float().flatten(0, 1), targets.flatten())

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of every next token."""
        return torch.log_softmax(logits.float(), dim=-1)

    def validation_metrics(self) -> torchmetrics.MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics.text import Perplexity

        return MetricCollection({"perplexity": Perplexity(ignore_index=PAD_ID)})

    def test_metrics(self) -> torchmetrics.MetricCollection:
        return self.validation_metrics()

    def report(self, computed: dict[str, torch.Tensor]) -> dict:
        perplexity = float(computed["perplexity"])
        return {
            "perplexity": perplexity,
            "cross_entropy": math.log(perplexity),
            "bits_per_token": math.log2(perplexity),
        }

    def row_outputs(self, predicted: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """Per text, the mean cross-entropy of its real tokens (log perplexity)."""
        real = targets != PAD_ID
        picked = predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (-(picked * real).sum(1) / real.sum(1).clamp(min=1)).numpy()

    def drift_values(self, row_losses: np.ndarray) -> dict[str, np.ndarray]:
        """Per text, its log perplexity."""
        return {"log_perplexity": row_losses}

    #: Tokens ``forgeml generate`` samples from, unless told otherwise.
    default_top_k = 50

    def generation_metrics(
        self, model: nn.Module, batches: Iterable[dict[str, np.ndarray]], preprocessor
    ) -> dict[str, float]:
        """None: what a language model writes has no reference text to be scored against
        (its perplexity says how well it predicts the test texts)."""
        return {}

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        preprocessor,
        prompts: list[str],
        max_tokens: int,
        temperature: float,
        top_k: int,
        generator: torch.Generator,
    ) -> list[str]:
        """Each prompt ("" starts a text) with a continuation sampled one token at a time
        from the ``top_k`` most likely (0: all; 1: the most likely), until [EOS] or
        ``max_tokens`` new tokens. Past ``max_length`` tokens the model sees the last
        ``max_length`` only, a window without the [BOS] that training always had."""
        model.eval()
        texts = extend(
            lambda ids, rows: model(ids),
            [preprocessor.prompt_ids(prompt) for prompt in prompts],
            Sampling(preprocessor.max_length, max_tokens, temperature, top_k, generator),
            preprocessor.end_id,
        )
        return [preprocessor.decode(ids) for ids in texts]


@dataclass(frozen=True)
class Sampling:
    """How ``extend`` picks tokens: ``top_k`` 1 is greedy decoding (temperature unused)."""

    context: int  # tokens in view, the last ones
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 1
    generator: torch.Generator | None = None


def extend(
    next_logits: Callable[[torch.Tensor, list[int]], torch.Tensor],
    starts: list[list[int]],
    sampling: Sampling,
    end_id: int,
) -> list[list[int]]:
    """Extend each token sequence one token at a time until it ends with ``end_id`` or
    has ``sampling.max_tokens`` new tokens. ``next_logits(ids, rows)`` gives (n, length,
    vocabulary) logits for the (n, length) right-padded sequences of the given rows."""
    sequences = [list(start) for start in starts]
    running = list(range(len(sequences)))
    for _ in range(sampling.max_tokens):
        if not running:
            break
        windows = [sequences[i][-sampling.context :] for i in running]
        ids = torch.zeros(len(windows), max(map(len, windows)), dtype=torch.int64)
        for row, window in enumerate(windows):
            ids[row, : len(window)] = torch.tensor(window)
        last = torch.tensor([len(window) - 1 for window in windows])
        logits = next_logits(ids, running)[torch.arange(len(windows)), last].float()
        logits[:, PAD_ID] = -math.inf  # before the top-k cut, which must keep real tokens
        if sampling.top_k == 1:
            drawn = logits.argmax(-1)
        else:
            logits = logits / sampling.temperature
            if sampling.top_k:
                kth = logits.topk(min(sampling.top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            probabilities = torch.softmax(logits, -1)
            drawn = torch.multinomial(probabilities, 1, generator=sampling.generator).squeeze(1)
        for i, token in zip(running, drawn.tolist(), strict=True):
            sequences[i].append(token)
        running = [i for i in running if sequences[i][-1] != end_id]
    return sequences
