"""Sequence to sequence: trained like a language model on the target's tokens, with the
target itself as the decoder's input (teacher forcing); tested by decoding greedily from
the source alone, scored with corpus BLEU (sacrebleu) and exact match."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import sacrebleu
import torch
from torch import nn

from forgeml.tasks import register_task
from forgeml.tasks.language_model import LanguageModelTask, Sampling, extend


@register_task("seq2seq")
class Seq2SeqTask(LanguageModelTask):
    default_top_k = 1  # greedy: a translation has one right answer

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
        """The translation of each prompt, decoded one token at a time from the ``top_k``
        most likely (1: greedy), up to [EOS] or ``max_tokens`` tokens. ValueError for a
        blank prompt or one longer than the model reads."""
        preprocessor.check_sources(prompts)
        sampling = Sampling(preprocessor.max_length, max_tokens, temperature, top_k, generator)
        return self.translate(model, preprocessor, preprocessor.source_ids(prompts), sampling)

    def translate(
        self, model: nn.Module, preprocessor, source_ids: np.ndarray, sampling: Sampling
    ) -> list[str]:
        """Translations of (N, max_length) source token ids."""
        model.eval()
        source = torch.from_numpy(source_ids)
        length = source.shape[1]

        def next_logits(ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
            decoder_input = torch.zeros(len(rows), length, dtype=torch.int64)
            decoder_input[:, : ids.shape[1]] = ids
            return model(torch.stack([source[rows], decoder_input], dim=1))

        starts = [[preprocessor.start_id]] * len(source)
        max_tokens = min(sampling.max_tokens, length - 1)
        decoded = extend(
            next_logits,
            starts,
            Sampling(length, max_tokens, sampling.temperature, sampling.top_k, sampling.generator),
            preprocessor.end_id,
        )
        return [preprocessor.decode(ids) for ids in decoded]

    def generation_metrics(
        self, model: nn.Module, batches: Iterable[dict[str, np.ndarray]], preprocessor
    ) -> dict[str, float]:
        """Greedy translations of the batches' sources against the targets' own text."""
        greedy = Sampling(preprocessor.max_length, preprocessor.max_length)
        hypotheses, references = [], []
        with torch.no_grad():
            for batch in batches:
                hypotheses += self.translate(model, preprocessor, batch["inputs"][:, 0], greedy)
                references += [preprocessor.decode(ids) for ids in batch["target"]]
        exact = np.mean([h == r for h, r in zip(hypotheses, references, strict=True)])
        return {
            "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "exact_match": float(exact),
        }
