"""Sequence to sequence: the generated dates, text pairs that round-trip exactly, the
decoder's causal mask, greedy translation, BLEU and exact match."""

import json

import numpy as np
import pytest
import torch
from forgeml.config import (
    ConfigError,
    Seq2SeqTask,
    Seq2SeqTransformerConfig,
    TextPairFeatures,
    config_from_dict,
)
from forgeml.data.dates import generate_dates
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.data.text import TextPairFeatures as TextPairColumns
from forgeml.models import build_model
from forgeml.tasks import build_task
from forgeml.tasks.language_model import Sampling

CFG = TextPairFeatures(source="text", target="iso", vocab_size=600, min_frequency=1, max_length=16)
DATES = generate_dates(400, seed=1)


def _fitted():
    batch = {column: DATES[column].to_numpy(dtype=object) for column in DATES}
    return TextPairColumns(CFG, None).fit_batches([batch])


def test_generated_dates_are_seeded_and_their_iso_form_is_right():
    first = generate_dates(50, seed=3)
    assert first.equals(generate_dates(50, seed=3)) and not first.equals(generate_dates(50, 4))
    assert DATES["iso"].str.fullmatch(r"(19|20)\d\d-\d\d-\d\d").all()
    by_iso = DATES.groupby("iso")["text"].first()
    for iso, text in by_iso.head(20).items():
        year = iso[:4]
        assert year in text  # four-digit years only: nothing to guess


def test_pairs_round_trip_exactly_and_frame_the_decoder():
    pre = _fitted()
    batch = {
        "text": np.array(["Tuesday, March 5th 1998"], dtype=object),
        "iso": np.array(["1998-03-05"], dtype=object),
    }
    out = pre.transform(batch)
    source, decoder_input = out["inputs"][0]
    assert pre.decode(source) == "Tuesday, March 5th 1998"  # spaces and case kept
    assert pre.decode(out["target"][0]) == "1998-03-05"
    assert decoder_input[0] == pre.start_id
    end = out["target"][0].tolist().index(pre.end_id)
    np.testing.assert_array_equal(decoder_input[1 : end + 1], out["target"][0][:end])
    restored = preprocessor_from_dict(json.loads(json.dumps(pre.to_dict())))
    np.testing.assert_array_equal(restored.transform(batch)["inputs"], out["inputs"])
    assert pre.model_inputs.shape == (2, 16) and pre.target.vocab_size == pre.vocab_size


def test_texts_too_long_for_the_model_are_refused_after_fitting():
    pre = _fitted()
    batch = {
        "text": np.array(["5 May 1998", "5 May 1998 " * 10], dtype=object),
        "iso": np.array(["1998-05-05 " * 10, "1998-05-05"], dtype=object),
    }
    assert pre.reject_reasons(batch).tolist() == [
        "iso: longer than 15 tokens (data.features.max_length)",
        "text: longer than 16 tokens (data.features.max_length)",
    ]


def test_empty_sources_or_targets_are_rejected():
    features = TextPairColumns(CFG, None)
    batch = {
        "text": np.array(["5 May 1998", "  ", "6 May 1998"], dtype=object),
        "iso": np.array(["1998-05-05", "1998-05-06", None], dtype=object),
    }
    assert features.reject_reasons(batch).tolist() == ["", "text: empty text", "iso: empty text"]


def _trained(pre, steps=150):
    torch.manual_seed(0)
    task = build_task(Seq2SeqTask(), pre.target)
    cfg = Seq2SeqTransformerConfig(d_model=32, heads=2, layers=1, feedforward=64, dropout=0.0)
    model = build_model(cfg, pre.model_inputs, task.num_outputs)
    pairs = DATES[DATES["text"].str.fullmatch(r"\d{4}/\d\d/\d\d")].head(40)
    out = pre.transform({c: pairs[c].to_numpy(dtype=object) for c in pairs})
    inputs, target = torch.from_numpy(out["inputs"]), torch.from_numpy(out["target"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = task.loss(model.train()(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task, model.eval(), pairs


def test_the_decoder_never_looks_ahead():
    pre = _fitted()
    task, model, pairs = _trained(pre, steps=0)
    rows = pre.transform({c: pairs[c].to_numpy(dtype=object) for c in pairs})
    inputs = torch.from_numpy(rows["inputs"][:2])
    changed = inputs.clone()
    changed[:, 1, 3] = 7
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    torch.testing.assert_close(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_greedy_translation_learns_a_memorised_mapping_and_is_scored():
    pre = _fitted()
    task, model, pairs = _trained(pre)
    translated = task.translate(model, pre, pre.source_ids(pairs["text"][:10]), Sampling(16, 16))
    assert sum(t == r for t, r in zip(translated, pairs["iso"][:10], strict=True)) >= 8
    rows = pre.transform({c: pairs[c].to_numpy(dtype=object) for c in pairs})
    halves = [
        {name: values[:20] for name, values in rows.items()},
        {name: values[20:] for name, values in rows.items()},
    ]
    scores = task.generation_metrics(model, halves, pre)
    assert scores["exact_match"] >= 0.8 and 50 < scores["bleu"] < 100.001


def test_seq2seq_needs_text_pairs_and_its_own_model():
    pairs = {
        "source": {"kind": "table", "builtin": "dates"},
        "features": {"kind": "text_pair", "source": "text", "target": "iso"},
    }
    model, task = {"kind": "seq2seq_transformer"}, {"kind": "seq2seq"}
    assert config_from_dict({"name": "t", "data": pairs, "model": model, "task": task})
    with pytest.raises(ConfigError, match="of kind text_pair, which task seq2seq learns from"):
        config_from_dict({"name": "t", "data": pairs, "model": model})
    with pytest.raises(
        ConfigError, match="model: causal_transformer is made for task language_model"
    ):
        config_from_dict(
            {"name": "t", "data": pairs, "model": {"kind": "causal_transformer"}, "task": task}
        )


def test_prompts_that_are_blank_or_too_long_are_refused():
    pre = _fitted()
    task, model, _ = _trained(pre, steps=0)
    with pytest.raises(ValueError, match="prompt 2: empty text"):
        task.sample(model, pre, ["5 May 1998", " "], 16, 1.0, 1, None)
    with pytest.raises(ValueError, match="prompt 1: .* tokens, more than the 16 the model reads"):
        task.sample(model, pre, ["5 May 1998 " * 10], 16, 1.0, 1, None)
