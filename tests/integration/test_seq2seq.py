"""The dates example on the shared Ray runtime: 1000 generated pairs as CSV with two
unusable rows, one epoch through the public entry point, a package scored by BLEU and
exact match, and `forgeml generate` translating prompts."""

from __future__ import annotations

import json

from forgeml.cli import main
from forgeml.data.dates import generate_dates

from tests.conftest import REPO


def test_dates_example_trains_on_a_subset_and_translates(ray_runtime, tmp_path, capsys):
    pairs = generate_dates(1000, seed=5)
    pairs.loc[0, "iso"] = ""  # nothing to learn: rejected before fitting
    pairs.loc[1, "text"] = "the " * 40 + "5th of May 1998"  # too long: rejected after fitting
    pairs.to_csv(tmp_path / "dates.csv", index=False)
    args = ["train", "--config", str(REPO / "examples" / "dates" / "config.yaml")]
    for override in (
        f"storage.root={tmp_path}",
        "data.source.builtin=null",
        f"data.source.path={tmp_path / 'dates.csv'}",
        "data.max_reject_fraction=0.01",
        "train.max_epochs=1",
        "model.d_model=32",
        "model.feedforward=64",
    ):
        args += ["--set", override]

    assert main(args) == 0

    package = tmp_path / "models" / "dates-to-iso" / "v1"
    metrics = json.loads((package / "metrics.json").read_text())
    assert metrics["data"]["rejected"] == {
        "iso: empty text": 1,
        "text: longer than 16 tokens (data.features.max_length)": 1,
    }
    test = metrics["test"]
    assert {"perplexity", "bleu", "exact_match"} <= set(test)
    assert 0 <= test["bleu"] <= 100.001 and 0 <= test["exact_match"] <= 1
    assert json.loads((package / "preprocessor.json").read_text())["kind"] == "text-pair"

    capsys.readouterr()
    generate = ["generate", "--model", "dates-to-iso", "--storage-root", str(tmp_path)]
    assert (
        main([*generate, "--prompt", "5 May 1998", "--prompt", "1999/12/31", "--samples", "1"]) == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(generate) == 2
    assert "a seq2seq model translates --prompt texts" in capsys.readouterr().err
