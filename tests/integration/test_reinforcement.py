"""Reinforcement learning on the shared Ray runtime: the CartPole example, cut short,
through the public entry point: RLlib under Tune, a complete policy package that beats
a random policy on held-out episodes and acts once loaded; DQN trains too; an
algorithm that cannot act in the environment is refused before anything starts."""

from __future__ import annotations

import json
import logging

import numpy as np
from forgeml.cli import main
from forgeml.config import StorageConfig
from forgeml.rl.package import load_policy
from forgeml.storage import ModelRegistry, Storage
from forgeml.tracking import run_summaries

from tests.conftest import REPO

CONFIG = REPO / "examples" / "cartpole" / "config.yaml"


def _train(folder, *overrides: str) -> int:
    args = ["train", "--config", str(CONFIG), "--set", f"storage.root={folder}"]
    for override in ("task.evaluation_episodes=20", "task.target_return=null", *overrides):
        args += ["--set", override]
    return main(args)


def test_a_short_ppo_run_registers_a_policy_better_than_random(ray_runtime, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="forgeml.rl")
    assert _train(tmp_path, "task.max_iterations=4", "task.checkpoint_every=2") == 0

    lines = [r.getMessage() for r in caplog.records if r.name == "forgeml.rl"]
    assert any(line.startswith("iteration 4/4  env steps") for line in lines), lines
    package = tmp_path / "models" / "cartpole-ppo" / "v1"
    assert {p.name for p in package.iterdir()} >= {
        "config.yaml",
        "model.pt",
        "metrics.json",
        "MODEL_CARD.md",
    }
    metrics = json.loads((package / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]
    assert metrics["status"] == "reached max_iterations"
    test, baseline = metrics["test"], metrics["baseline"]
    assert test["episodes"] == len(test["returns"]) == 20
    # Four iterations of 4000 steps take CartPole's return from about 22 to over 100.
    assert test["return_mean"] > 2 * baseline["test"]["return_mean"], (test, baseline)
    assert baseline["compared"][0]["worse"] is False and baseline["warning"] is None
    assert "`CartPole-v1`" in (package / "MODEL_CARD.md").read_text()

    registry = ModelRegistry(Storage(StorageConfig(root=str(tmp_path))))
    (summary,) = run_summaries(registry)
    assert (summary["epochs"], summary["best_epoch"], summary["selected_by"]) == (
        4,
        4,
        "episode_return_mean",
    )
    policy, _ = load_policy(registry, "cartpole-ppo")
    acted = policy.act(np.zeros((3, 4), dtype=np.float32))
    assert acted["actions"].shape == (3,) and acted["probabilities"].shape == (3, 2)


def test_dqn_trains_and_registers_and_cannot_take_continuous_actions(ray_runtime, tmp_path, capsys):
    dqn = ["task.algorithm={name: dqn}", "model.share_value_layers=false"]
    assert _train(tmp_path, *dqn, "task.max_iterations=2") == 0
    metrics = json.loads((tmp_path / "models/cartpole-ppo/v1/metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["history"][-1]["env_steps"] > 0

    assert _train(tmp_path, *dqn, "env.id=Pendulum-v1") == 2
    assert "task.algorithm: dqn needs discrete actions" in capsys.readouterr().err
