"""Text without Ray: cleaning and rejects, the tokenizer fitted on training texts, the
round trip through preprocessor.json, request checks, and the sequence models."""

import json

import numpy as np
import pytest
import torch
from forgeml.config import (
    BagOfNgramsConfig,
    ConfigError,
    RNNConfig,
    TextFeatures,
    TransformerConfig,
    config_from_dict,
)
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.data.text import TextColumnFeatures
from forgeml.models import build_model
from forgeml.models.text import masked_max

CFG = TextFeatures(text="text", target="label", vocab_size=100, min_frequency=1, max_length=6)
TRAIN = {
    "text": np.array(
        ["Love this car @dealer", "hate the traffic http://t.co/x", "the car is fine", "LOVE it"],
        dtype=object,
    ),
    "label": np.array(["pos", "neg", "neu", "pos"], dtype=object),
}


def _fitted():
    return TextColumnFeatures(CFG, None).fit_batches([TRAIN])


def test_texts_empty_after_cleaning_and_missing_classes_are_rejected():
    batch = {
        "text": np.array(["fine", "  @someone http://x.y  ", None, "ok", "great"], dtype=object),
        "label": np.array(["pos", "neg", "neg", None, "neu"], dtype=object),
    }
    reasons = TextColumnFeatures(CFG, None).reject_reasons(batch)
    assert reasons.tolist() == [
        "",
        "text: empty text",
        "text: empty text",
        "label: missing target",
        "",
    ]
    declared = CFG.model_copy(update={"class_names": ["pos", "neg"]})
    assert TextColumnFeatures(declared, None).reject_reasons(batch)[4] == (
        "label: not one of data.features.class_names"
    )


def test_the_vocabulary_comes_from_the_training_texts_and_cleaning_is_stored():
    pre = _fitted()
    vocab = json.loads(pre.tokenizer)["model"]["vocab"]
    assert {"love", "car", "hate", "[PAD]", "[UNK]"} <= set(vocab) and vocab["[PAD]"] == 0
    assert not {"@dealer", "dealer", "http", "Love"} & set(vocab)  # cleaned before training
    assert pre.target.classes == ("neg", "neu", "pos")
    out = pre.transform(TRAIN)
    assert out["inputs"].shape == (4, 6) and out["inputs"].dtype == np.int64
    assert out["target"].tolist() == [2, 0, 1, 2]
    # padding fills the tail with 0; long texts are cut at max_length
    assert (out["inputs"][3, 2:] == 0).all()
    long = pre.token_ids(["car " * 20])
    assert long.shape == (1, 6) and (long != 0).all()
    assert pre.model_inputs.dtype == "int64" and pre.model_inputs.vocab_size == len(vocab)


def test_preprocessor_json_round_trip_tokenizes_identically():
    pre = _fitted()
    restored = preprocessor_from_dict(json.loads(json.dumps(pre.to_dict())))
    texts = ["Love the CAR http://x", "unseen words here"]
    np.testing.assert_array_equal(restored.token_ids(texts), pre.token_ids(texts))
    summary = pre.input_summary(pre.token_ids(texts))
    assert summary["unknown_share"][1] > 0 and summary["tokens"][0] == 3


def test_classes_unseen_in_training_are_refused_after_fitting():
    reasons = _fitted().reject_reasons({"label": np.array(["pos", "angry"], dtype=object)})
    assert reasons.tolist() == ["", "label: class not in the training split"]


def test_requests_need_one_non_empty_text_field():
    pre = _fitted()
    assert pre.request_columns([{"text": "love it"}])["text"].tolist() == ["love it"]
    with pytest.raises(ValueError, match="instances.0: expected an object with one field, 'text'"):
        pre.request_columns([{"text": "a", "extra": 1}])
    with pytest.raises(ValueError, match="instances.1.text: expected non-empty text"):
        pre.request_columns([{"text": "a"}, {"text": " "}])


def test_sequence_models_classify_token_ids():
    pre = _fitted()
    ids = torch.from_numpy(pre.token_ids(["love the car", "hate"]))
    cfg = TransformerConfig(d_model=16, heads=2, feedforward=32)
    assert build_model(cfg, pre.model_inputs, 3).eval()(ids).shape == (2, 3)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_the_rnn_ignores_padding(pooling):
    pre = _fitted()
    cfg = RNNConfig(embedding_dim=8, hidden=8, pooling=pooling)
    model = build_model(cfg, pre.model_inputs, 3).eval()
    ids = torch.from_numpy(pre.token_ids(["love the car"]))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        np.testing.assert_allclose(model(padded), model(ids), atol=1e-6)


def test_token_models_need_text_and_text_needs_a_token_model():
    table = {"source": {"kind": "table", "path": "t.csv"}}
    text = {**table, "features": {"kind": "text", "text": "t", "target": "y"}}
    with pytest.raises(
        ConfigError,
        match="of kind text needs model transformer or rnn or bag_of_ngrams \\(got mlp\\)",
    ):
        config_from_dict({"name": "t", "data": text, "model": {"kind": "mlp"}})
    with pytest.raises(
        ConfigError,
        match="model: task classification on an image source needs model cnn or mlp \\(got rnn\\)",
    ):
        config_from_dict({"name": "t", "model": {"kind": "rnn"}})
    with pytest.raises(ConfigError, match="needs model cnn or mlp \\(got bag_of_ngrams\\)$"):
        config_from_dict({"name": "t", "model": {"kind": "bag_of_ngrams"}})
    with pytest.raises(ConfigError, match="heads \\(3\\) must divide d_model \\(64\\)"):
        config_from_dict({"name": "t", "data": text, "model": {"kind": "transformer", "heads": 3}})
    assert (
        config_from_dict({"name": "t", "data": text, "model": {"kind": "rnn"}}).model.cell == "lstm"
    )


def test_the_bag_of_ngrams_ignores_padding_and_reads_word_order():
    pre = _fitted()
    model = build_model(BagOfNgramsConfig(ngrams=2), pre.model_inputs, 3).eval()
    ids = torch.from_numpy(pre.token_ids(["love the car", "the car love"]))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        np.testing.assert_allclose(model(padded), model(ids), atol=1e-6)
        # the same words in another order: another pair of neighbours, another mean
        assert not torch.allclose(model(ids)[0], model(ids)[1])
        unigrams = build_model(BagOfNgramsConfig(ngrams=1), pre.model_inputs, 3).eval()
        torch.testing.assert_close(unigrams(ids)[0], unigrams(ids)[1])
    # every run of neighbours that touches padding is padding
    runs = model.run_ids(padded)
    real = (padded[:, :-1] != 0) & (padded[:, 1:] != 0)
    assert runs.shape == real.shape and ((runs == 0) == ~real).all()


def test_a_config_without_a_model_gets_the_usual_one_for_its_data():
    table = {"kind": "table", "path": "t.csv"}
    kinds = {
        "tabular": {"kind": "tabular", "target": "y", "numeric": ["x"]},
        "text": {"kind": "text", "text": "t", "target": "y"},
        "series": {"kind": "series", "time": "t", "value": "v", "window": 4, "horizon": 1},
    }
    tasks = {"tabular": "classification", "text": "classification", "series": "forecast"}
    models = {"tabular": "mlp", "text": "bag_of_ngrams", "series": "rnn"}
    for kind, features in kinds.items():
        raw = {"name": "t", "data": {"source": table, "features": features}}
        cfg = config_from_dict({**raw, "task": {"kind": tasks[kind]}})
        assert cfg.model.kind == models[kind]
    # a model section without a kind sets fields of that default model
    raw = {"name": "t", "data": {"source": table, "features": kinds["tabular"]}}
    assert config_from_dict({**raw, "model": {"hidden": [8]}}).model.hidden == [8]
    assert config_from_dict({"name": "t"}).model.kind == "cnn"
    assert config_from_dict({"name": "t", "task": {"kind": "vae"}}).model.kind == "conv_vae"


def test_max_pooling_takes_each_units_largest_real_value():
    hidden = torch.tensor(
        [[[1.0, -5.0], [3.0, -2.0], [9.0, 9.0]], [[-1.0, 0.5], [7.0, 7.0], [0, 0]]]
    )
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(masked_max(hidden, mask), torch.tensor([[3.0, -2.0], [-1.0, 0.5]]))
    torch.testing.assert_close(
        masked_max(hidden, torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 2)
    )
