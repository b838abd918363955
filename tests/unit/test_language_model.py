"""Language modelling without Ray: framing texts for next-token prediction, the causal
Transformer, perplexity, sampling, and the config rules that tie the parts together."""

import json
import math

import numpy as np
import pytest
import torch
from forgeml.config import (
    CausalTransformerConfig,
    ConfigError,
    CorpusFeatures,
    LanguageModelTask,
    config_from_dict,
)
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.data.text import CorpusFeatures as CorpusColumn
from forgeml.models import build_model
from forgeml.tasks import build_task

CFG = CorpusFeatures(text="text", vocab_size=100, min_frequency=1, max_length=8)
TEXTS = np.array(
    ["the car drives itself", "i love the car", "the car is late again", "LOVE it @x"] * 10,
    dtype=object,
)


def _fitted():
    return CorpusColumn(CFG, None).fit_batches([{"text": TEXTS}])


def _model(pre, seed=0):
    torch.manual_seed(seed)
    task = build_task(LanguageModelTask(), pre.target)
    cfg = CausalTransformerConfig(d_model=32, heads=2, layers=1, feedforward=64, dropout=0.0)
    return task, build_model(cfg, pre.model_inputs, task.num_outputs)


def test_texts_are_framed_and_the_target_is_the_next_token():
    pre = _fitted()
    out = pre.transform({"text": np.array(["i love the car", "car " * 20], dtype=object)})
    inputs, target = out["inputs"], out["target"]
    assert inputs.shape == target.shape == (2, 8)
    assert inputs[0, 0] == pre.start_id and pre.end_id in target[0]
    # The target is the input shifted by one; padding (0) follows [EOS].
    np.testing.assert_array_equal(target[:, :-1], inputs[:, 1:])
    assert pre.decode(inputs[0].tolist()) == "i love the car"
    end = target[0].tolist().index(pre.end_id)
    assert (target[0, end + 1 :] == 0).all()
    # A text longer than the context is cut, its [EOS] with it.
    assert pre.end_id not in target[1] and (target[1] != 0).all()
    assert pre.target.vocab_size == pre.model_inputs.vocab_size == pre.vocab_size


def test_empty_texts_are_rejected_and_a_corpus_of_them_fits_nothing():
    features = CorpusColumn(CFG, None)
    texts = np.array(["fine", " @someone ", None], dtype=object)
    assert features.reject_reasons({"text": texts}).tolist() == [
        "",
        "text: empty text",
        "text: empty text",
    ]
    with pytest.raises(ValueError, match="the training split is empty"):
        features.fit_batches([{"text": np.array([None], dtype=object)}])


def test_preprocessor_json_round_trip_frames_identically():
    pre = _fitted()
    restored = preprocessor_from_dict(json.loads(json.dumps(pre.to_dict())))
    batch = {"text": TEXTS[:4]}
    np.testing.assert_array_equal(
        restored.transform(batch)["inputs"], pre.transform(batch)["inputs"]
    )
    assert restored.describe()["kind"] == "text"


def test_the_causal_transformer_never_looks_ahead():
    pre = _fitted()
    _, model = _model(pre)
    ids = torch.from_numpy(pre.transform({"text": TEXTS[:2]})["inputs"])
    changed = ids.clone()
    changed[:, 4] = 5
    with torch.no_grad():
        before, after = model.eval()(ids), model(changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_an_untrained_model_is_near_uniform_and_training_lowers_perplexity():
    pre = _fitted()
    task, model = _model(pre)
    out = pre.transform({"text": TEXTS})
    ids, target = torch.from_numpy(out["inputs"]), torch.from_numpy(out["target"])

    def perplexity():
        metrics = task.test_metrics()
        with torch.no_grad():
            metrics.update(task.predict(model.eval()(ids)), target)
        return task.report(metrics.compute())

    untrained = perplexity()
    assert untrained["perplexity"] == pytest.approx(pre.vocab_size, rel=0.2)
    assert untrained["cross_entropy"] == pytest.approx(math.log(untrained["perplexity"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = task.loss(model.train()(ids), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = perplexity()
    assert trained["perplexity"] < 3
    with torch.no_grad():
        per_text = task.row_outputs(task.predict(model.eval()(ids)), target)
    assert per_text.shape == (len(TEXTS),)
    assert np.exp(per_text.mean()) == pytest.approx(trained["perplexity"], rel=0.3)


def test_sampling_continues_prompts_and_is_reproducible_with_a_seed():
    pre = _fitted()
    task, model = _model(pre)

    def draw(seed):
        return task.sample(
            model, pre, ["i love", ""], 5, 1.0, 10, torch.Generator().manual_seed(seed)
        )

    first = draw(0)
    assert first == draw(0) and len(first) == 2
    assert first[0].startswith("i love")
    assert all(len(sample.split()) <= 2 + 5 for sample in first)


def test_a_language_model_needs_a_corpus_and_a_causal_model():
    table = {"source": {"kind": "table", "path": "t.csv"}}
    corpus = {**table, "features": {"kind": "corpus", "text": "t"}}
    lm = {"kind": "language_model"}
    causal = {"kind": "causal_transformer"}
    assert config_from_dict({"name": "t", "data": corpus, "model": causal, "task": lm})
    with pytest.raises(ConfigError, match="of kind corpus, which task language_model learns from"):
        config_from_dict({"name": "t", "data": corpus, "model": causal})
    with pytest.raises(
        ConfigError,
        match="model: task language_model on data.features of kind corpus needs model "
        "causal_transformer \\(got mlp\\)",
    ):
        config_from_dict({"name": "t", "data": corpus, "model": {"kind": "mlp"}, "task": lm})
    text = {**table, "features": {"kind": "text", "text": "t", "target": "y"}}
    with pytest.raises(ConfigError, match="task: language_model needs data.features"):
        config_from_dict({"name": "t", "data": text, "model": causal, "task": lm})
    with pytest.raises(ConfigError, match="train.early_stopping.metric: language_model does not"):
        config_from_dict(
            {
                "name": "t",
                "data": corpus,
                "model": causal,
                "task": lm,
                "train": {"early_stopping": {"metric": "val_accuracy"}},
            }
        )
