"""Train the tweets language model and compare its test perplexity with a unigram model's
on the same tokens; print one JSON object with both and a few sampled tweets.

    python examples/tweets_lm/compare.py [--storage-root DIR]

The unigram baseline counts the tokens of the training split, as the trained package's
own tokenizer cuts them ([EOS] included), with add-one smoothing, and scores the test
split's tokens: the same tokens the Transformer's perplexity is measured on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import ray
import torch
from forgeml.config import load_config
from forgeml.data.pipeline import usable_rows
from forgeml.data.sources import open_source
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage
from forgeml.tasks.language_model import PAD_ID
from forgeml.train.trainer import run_training

HERE = Path(__file__).parent


def unigram_perplexity(cfg, preprocessor) -> dict:
    """Perplexity on the test tokens of token frequencies counted on the training split."""
    source = open_source(cfg, Storage(cfg.storage))
    splits = usable_rows(cfg, source)
    train, test = (
        preprocessor.transform(splits[name].to_dict("series"))["target"]
        for name in ("train", "test")
    )
    # Every token but [PAD] and [BOS] can be a target: those are the outcomes smoothed over.
    outcomes = preprocessor.vocab_size - 2
    counts = np.bincount(train[train != PAD_ID], minlength=preprocessor.vocab_size)
    log_p = np.log((counts + 1) / (counts.sum() + outcomes))
    tokens = test[test != PAD_ID]
    return {
        "perplexity": round(math.exp(-log_p[tokens].mean()), 2),
        "test_tokens": int(tokens.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=None, help="default: the config's root")
    args = parser.parse_args()
    overrides = [f"storage.root={args.storage_root}"] if args.storage_root else []
    cfg = load_config(HERE / "config.yaml", overrides)
    started = time.monotonic()
    outcome = run_training(cfg)
    wall_s = round(time.monotonic() - started, 1)
    loaded = load_model(ModelRegistry(Storage(cfg.storage)), outcome.version.ref)
    test = outcome.metrics["test"]
    samples = loaded.task.sample(
        loaded.model,
        loaded.preprocessor,
        ["", "", "", "self driving cars", "i would never"],
        max_tokens=30,
        temperature=0.8,
        top_k=50,
        generator=torch.Generator().manual_seed(0),
    )
    results = {
        "transformer": {
            "model": outcome.version.ref,
            "epochs": outcome.epochs,
            "best_epoch": outcome.metrics["best_epoch"],
            "train_wall_s": wall_s,
            "rows": outcome.metrics["data"]["rows"],
            "rejected": outcome.metrics["data"]["rejected"],
            "perplexity": round(test["perplexity"], 2),
            "bits_per_token": round(test["bits_per_token"], 3),
        },
        "unigram": unigram_perplexity(cfg, loaded.preprocessor),
        "samples": samples,
    }
    ray.shutdown()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps({"example": "tweets_lm", "machine": machine, **results}, indent=2))


if __name__ == "__main__":
    main()
