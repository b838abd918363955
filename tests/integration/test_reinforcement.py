"""Reinforcement learning on the shared Ray runtime: the CartPole example, cut short,
through the public entry points: RLlib under Tune, a run whose driver is killed resumes
from its checkpoint and outlives losing an env runner, and its complete policy package
beats a random policy on held-out episodes and acts once loaded; DQN trains too; an
algorithm that cannot act in the environment is refused before anything starts; PPO
learns Pendulum's continuous actions; a search over the learning rate, whose driver is
killed and resumed, prunes the rate that learns nothing and tracks every trial."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import ray
import yaml
from forgeml.cli import main
from forgeml.config import StorageConfig
from forgeml.rl.package import load_policy
from forgeml.storage import ModelRegistry, Storage
from forgeml.tracking import run_summaries

from tests.conftest import REPO
from tests.integration.tracked import mlflow_client, mlflow_runs, tensorboard_scalars
from tests.report_check import check_report

CONFIG = REPO / "examples" / "cartpole" / "config.yaml"


def _train_args(folder, *overrides: str) -> list[str]:
    args = ["train", "--config", str(CONFIG), "--set", f"storage.root={folder}"]
    for override in ("task.evaluation_episodes=20", "task.target_return=null", *overrides):
        args += ["--set", override]
    return args


def _train(folder, *overrides: str) -> int:
    return main(_train_args(folder, *overrides))


def _kill_driver_once(args: list[str], folder, pattern: str) -> None:
    """Run the CLI command ``args`` as its job script (``jobs/train.py`` for ``train``)
    in a driver of its own on the shared runtime, and SIGKILL it as soon as a path in
    ``folder`` matches ``pattern``."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / f"{args[0]}.py"), *args[1:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list(folder.glob(pattern)) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.kill()
    driver.wait()
    assert driver.returncode == -signal.SIGKILL, "the driver ended before it could be killed"


def test_dqn_trains_and_registers_and_cannot_take_continuous_actions(ray_runtime, tmp_path, capsys):
    dqn = ["task.algorithm={name: dqn}", "model.share_value_layers=false"]
    assert _train(tmp_path, *dqn, "task.max_iterations=1", "task.evaluation_episodes=5") == 0
    metrics = json.loads((tmp_path / "models/cartpole-ppo/v1/metrics.json").read_text())
    assert len(metrics["history"]) == 1 and metrics["history"][-1]["env_steps"] > 0

    assert _train(tmp_path, *dqn, "env.id=Pendulum-v1") == 2
    assert "task.algorithm: dqn needs discrete actions" in capsys.readouterr().err


def _env_runners() -> set[int]:
    return {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith("ray::SingleAgentEnvRunner")
    }


def _kill_a_new_env_runner_once(iterated: Callable[[], bool]) -> list[int]:
    """SIGKILLs the env runner that starts from now on, as when its node is lost, once
    ``iterated()`` says the run has trained an iteration; returns the pids killed."""
    before = _env_runners()
    killed: list[int] = []

    def kill():
        deadline = time.monotonic() + 240
        while not killed and time.monotonic() < deadline:
            runners = _env_runners() - before
            if runners and iterated():
                for pid in runners:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.1)

    threading.Thread(target=kill, daemon=True).start()
    return killed


def test_a_ppo_run_whose_driver_is_killed_resumes_and_registers_a_policy_better_than_random(
    ray_runtime, tmp_path, caplog
):
    args = _train_args(
        tmp_path, "task.max_iterations=4", "task.checkpoint_every=2", "tracking.mlflow={}"
    )
    # Tune's first checkpoint is iteration 2's.
    _kill_driver_once(args, tmp_path / "runs", "*/*/checkpoint_000000")
    assert not (tmp_path / "models").exists()
    caplog.set_level(logging.INFO, logger="forgeml.rl")
    killed = _kill_a_new_env_runner_once(
        lambda: any(r.getMessage().startswith("iteration ") for r in caplog.records)
    )

    assert main([*args, "--resume"]) == 0

    assert killed, "no env runner of the resumed run was found to kill"
    lines = [r.getMessage() for r in caplog.records if r.name == "forgeml.rl"]
    assert any(line.startswith("iteration 4/4  env steps") for line in lines), lines
    # The lost env runner failed the run, which Tune restored from its latest checkpoint
    # or its start (iterations after it are reported again, and kept once in the history).
    done = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("iteration ")]
    assert done != sorted(set(done)) and done[-1] == 4, lines
    (run,) = (tmp_path / "runs").iterdir()
    package = tmp_path / "models" / "cartpole-ppo" / "v1"
    assert {p.name for p in package.iterdir()} >= {
        "config.yaml",
        "model.pt",
        "metrics.json",
        "MODEL_CARD.md",
        "report.html",
    }
    # Every iteration logged once in TensorBoard (what the lost attempts logged past the
    # iteration they went on from is dropped), and into one MLflow run across restores.
    scalars = tensorboard_scalars(run / "tensorboard")
    assert [step for step, _ in scalars["episode_return_mean"]] == [1, 2, 3, 4]
    (tracked,) = mlflow_runs(tmp_path, "cartpole-ppo")
    assert tracked.info.status == "FINISHED"
    assert tracked.data.tags["forgeml.model_version"] == "cartpole-ppo:v1"
    client = mlflow_client(tmp_path)
    steps = {m.step for m in client.get_metric_history(tracked.info.run_id, "env_steps")}
    assert steps == {1, 2, 3, 4} and "test/return_mean" in tracked.data.metrics
    headings = check_report(package / "report.html", tmp_path, min_images=2)
    assert headings[:4] == ["Evaluation", "Baseline", "Training curves", "Evaluation returns"]
    again = tmp_path / "again.html"
    root = ["--storage-root", str(tmp_path)]
    assert main(["report", "--model", "cartpole-ppo", *root, "--output", str(again)]) == 0
    assert re.findall(r"<h2>(.*?)</h2>", again.read_text()) == headings
    metrics = json.loads((package / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 5))
    assert metrics["status"] == "reached max_iterations"
    test, baseline = metrics["test"], metrics["baseline"]
    assert test["episodes"] == len(test["returns"]) == 20
    # Four iterations of 4000 steps take CartPole's greedy return from about 22 to over 100.
    assert test["return_mean"] > 2 * baseline["test"]["return_mean"], (test, baseline)
    assert baseline["compared"][0]["worse"] is False and baseline["warning"] is None
    assert "`CartPole-v1`" in (package / "MODEL_CARD.md").read_text()

    registry = ModelRegistry(Storage(StorageConfig(root=str(tmp_path))))
    (summary,) = run_summaries(registry)
    assert (summary["epochs"], summary["selected_by"]) == (4, "episode_return_mean")
    policy, _ = load_policy(registry, "cartpole-ppo")
    acted = policy.act(np.zeros((3, 4), dtype=np.float32))
    assert acted["actions"].shape == (3,) and acted["probabilities"].shape == (3, 2)


CORRIDOR = """
import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    \"\"\"Walk to the right end of ``length`` cells: -0.1 a step, 1 at the end.\"\"\"

    def __init__(self, length):
        self.length = length
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.position = max(0, self.position + (1 if action == 1 else -1))
        end = self.position == self.length
        observation = np.array([self.position / self.length], np.float32)
        return observation, 1.0 if end else -0.1, end, False, {}
"""


def test_a_users_own_environment_in_the_working_directory_trains(ray_runtime, tmp_path):
    """``forgeml train`` run where the user's environment module is: the driver imports
    it from the working directory, and Ray's env runners from the driver's directory."""
    (tmp_path / "myenvs.py").write_text(CORRIDOR)
    config = {
        "name": "corridor",
        "env": {"entry_point": "myenvs:Corridor", "kwargs": {"length": 5}, "max_episode_steps": 50},
        "task": {
            "kind": "reinforcement",
            "algorithm": {"name": "ppo", "train_batch_size": 1000},
            "max_iterations": 2,
            "evaluation_episodes": 5,
        },
    }
    (tmp_path / "corridor.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    forgeml = Path(sys.executable).parent / "forgeml"
    done = subprocess.run(
        [str(forgeml), "train", "--config", "corridor.yaml", "--set", "storage.root=store"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "store/models/corridor/v1/metrics.json").read_text())
    # Five steps right is the best (1 - 4 x 0.1); a random walk's return is below 0.
    assert metrics["test"]["return_mean"] > 0 > metrics["baseline"]["test"]["return_mean"]


def test_ppo_learns_continuous_actions_from_the_pendulum_example(ray_runtime, tmp_path):
    """The second example, cut short: one continuous action, scaled by RLlib in training
    and by the policy when it acts."""
    config = REPO / "examples" / "pendulum" / "config.yaml"
    overrides = ["task.max_iterations=8", "task.evaluation_episodes=20", f"storage.root={tmp_path}"]
    assert (
        main(["train", "--config", str(config), *(a for o in overrides for a in ("--set", o))]) == 0
    )

    metrics = json.loads((tmp_path / "models/pendulum-ppo/v1/metrics.json").read_text())
    test, random = metrics["test"], metrics["baseline"]["test"]
    # A random policy's return is about -1,200; eight iterations of 4,000 steps take the
    # greedy policy's to about -500 (seed 0).
    assert test["return_mean"] > random["return_mean"] + 300, (test, random)
    registry = ModelRegistry(Storage(StorageConfig(root=str(tmp_path))))
    policy, _ = load_policy(registry, "pendulum-ppo")
    angles = np.linspace(-np.pi, np.pi, 16)
    observations = np.stack([np.cos(angles), np.sin(angles), np.full(16, 8.0)], axis=1)
    actions = policy.act(observations.astype(np.float32))["actions"]
    assert actions.shape == (16, 1) and np.all(np.abs(actions) <= 2.0)


def test_a_search_prunes_a_learning_rate_that_learns_nothing_and_registers_the_best_policy(
    ray_runtime, tmp_path, capsys
):
    """Two trials one after the other, so that ASHA's rung at iteration 2 compares the
    second with the first: with the same seed their first iterations sample the same
    episodes, and only the rate that learns makes the second iteration's longer. The
    search's driver is killed at the first trial's first checkpoint and ``--resume``
    goes on with it."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw["tune"] = {
        "search": {"kind": "grid"},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 1,
        "space": {"task.algorithm.lr": {"kind": "grid", "values": [3e-4, 1e-7]}},
    }
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    overrides = [
        "task.max_iterations=3",
        "task.evaluation_episodes=10",
        "task.target_return=null",
        "tracking.mlflow={}",
    ]
    args = ["tune", "--config", str(config), "--set", f"storage.root={tmp_path}"]
    args += [a for o in overrides for a in ("--set", o)]
    _kill_driver_once(args, tmp_path / "tune", "*/*/checkpoint_000000")
    assert main([*args, "--resume"]) == 0

    out = capsys.readouterr().out
    assert "search: 2 trials (grid, asha) for the best episode_return_mean" in out
    (search,) = (tmp_path / "tune").iterdir()
    trials = pd.read_parquet(search / "tune_results.parquet").set_index("param.task.algorithm.lr")
    assert trials.loc[3e-4, ["iterations", "state"]].tolist() == [3, "completed"]
    assert trials.loc[1e-7, "state"] == "pruned" and trials.loc[1e-7, "iterations"] < 3
    assert trials.loc[3e-4, "episode_return_mean"] > trials.loc[1e-7, "episode_return_mean"]
    best = yaml.safe_load((search / "best_config.yaml").read_text())
    assert best["task"]["algorithm"]["lr"] == 3e-4 and best["tune"] is None
    metrics = json.loads((tmp_path / "models/cartpole-ppo/v1/metrics.json").read_text())
    assert metrics["run"]["name"] == search.name and len(metrics["history"]) == 3
    assert metrics["test"]["episodes"] == 10
    assert metrics["test"]["return_mean"] > metrics["baseline"]["test"]["return_mean"]
    assert "registered cartpole-ppo:v1" in out and "/v1/models/cartpole-ppo/act" in out
    # Each trial logs its iterations into an MLflow run of its own, tagged with the search;
    # the pruned one ends KILLED, and the registered policy is added to the best one's.
    tracked = {
        float(run.data.params["task.algorithm.lr"]): run
        for run in mlflow_runs(tmp_path, "cartpole-ppo")
    }
    assert set(tracked) == {3e-4, 1e-7}
    for lr, run in tracked.items():
        assert run.data.tags["forgeml.tune_experiment"] == search.name
        assert run.info.run_name == trials.loc[lr, "trial_id"]
        # (the first trial's iterations after its checkpoint are logged twice)
        steps = mlflow_client(tmp_path).get_metric_history(run.info.run_id, "episode_return_mean")
        assert {m.step for m in steps} == set(range(1, trials.loc[lr, "iterations"] + 1))
    assert tracked[1e-7].info.status == "KILLED"
    assert tracked[3e-4].info.status == "FINISHED"
    assert tracked[3e-4].data.tags["forgeml.model_version"] == "cartpole-ppo:v1"
    assert "test/return_mean" in tracked[3e-4].data.metrics
