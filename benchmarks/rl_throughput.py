"""PPO on CartPole-v1: forgeml against a bare RLlib script and Stable-Baselines3, with
the same hyperparameters (forgeml's PPO defaults, which are Stable-Baselines3's except
the batch sizes), until the mean return of the last 100 training episodes reaches 475.

Each system runs in a fresh process, one after the other, per seed. Measured: the
wall-clock of the whole process (imports, Ray start-up, training, and for forgeml its
evaluation and registration), the training time, and environment steps per second of
training. Prints one JSON object with the ratios of forgeml to the others.

    python benchmarks/rl_throughput.py [--seeds 0 1 2] [--max-iterations 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

TARGET = 475.0
#: forgeml's PPO defaults (config/tasks.py) and its policy_mlp defaults, spelled out for
#: the two baselines: 4 environments of 1,000 steps per iteration.
ENVS, STEPS_PER_ENV, MINIBATCH, EPOCHS = 4, 1000, 128, 10
LR, GAMMA, LAMBDA, CLIP, VF_COEFF, GRAD_CLIP = 3e-4, 0.99, 0.95, 0.2, 0.5, 0.5
HIDDEN = [64, 64]

FORGEML = """
import json, sys
from forgeml.config import config_from_dict
from forgeml.rl.train import run_reinforcement
seed, root, iterations = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = config_from_dict({
    "name": "bench-cartpole", "seed": seed, "storage": {"root": root},
    "env": {"id": "CartPole-v1"},
    "task": {"kind": "reinforcement", "target_return": TARGET, "max_iterations": iterations},
})
outcome = run_reinforcement(cfg)
last = outcome.metrics["history"][-1]
print("RESULT", json.dumps({"env_steps": last["env_steps"], "train_s": last["time_s"],
    "return": last["episode_return_mean"]}))
"""

BARE_RLLIB = """
import json, sys
import ray
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
seed, iterations = int(sys.argv[1]), int(sys.argv[3])
ray.init()
algo = (
    PPOConfig()
    .environment("CartPole-v1")
    .env_runners(num_env_runners=1, num_envs_per_env_runner=ENVS)
    .training(lr=LR, gamma=GAMMA, lambda_=LAMBDA, clip_param=CLIP, vf_loss_coeff=VF_COEFF,
              vf_clip_param=float("inf"), grad_clip=GRAD_CLIP, num_epochs=EPOCHS,
              train_batch_size_per_learner=ENVS * STEPS_PER_ENV, minibatch_size=MINIBATCH)
    .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=HIDDEN, vf_share_layers=False))
    .debugging(seed=seed)
    .build_algo()
)
train_s = 0.0
for _ in range(iterations):
    result = algo.train()
    train_s += result["time_this_iter_s"]
    mean = result["env_runners"].get("episode_return_mean", 0)
    if mean >= TARGET:
        break
print("RESULT", json.dumps({"env_steps": result["num_env_steps_sampled_lifetime"],
    "train_s": train_s, "return": mean}))
"""

STABLE_BASELINES3 = """
import json, sys, time
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
seed, iterations = int(sys.argv[1]), int(sys.argv[3])

class Target(BaseCallback):
    def _on_step(self):
        returns = [e["r"] for e in self.model.ep_info_buffer]
        return not (len(returns) >= 20 and np.mean(returns) >= TARGET)

env = make_vec_env("CartPole-v1", n_envs=ENVS, seed=seed)
model = PPO("MlpPolicy", env, n_steps=STEPS_PER_ENV, batch_size=MINIBATCH, n_epochs=EPOCHS,
            learning_rate=LR, gamma=GAMMA, gae_lambda=LAMBDA, clip_range=CLIP,
            vf_coef=VF_COEFF, max_grad_norm=GRAD_CLIP, seed=seed, device="cpu",
            policy_kwargs={"net_arch": {"pi": HIDDEN, "vf": HIDDEN}})
started = time.monotonic()
model.learn(total_timesteps=iterations * ENVS * STEPS_PER_ENV, callback=Target())
print("RESULT", json.dumps({"env_steps": model.num_timesteps,
    "train_s": time.monotonic() - started,
    "return": float(np.mean([e["r"] for e in model.ep_info_buffer]))}))
"""


def constants() -> str:
    """The shared hyperparameters, as the scripts' first lines."""
    names = ("TARGET", "ENVS", "STEPS_PER_ENV", "MINIBATCH", "EPOCHS", "LR", "GAMMA")
    names += ("LAMBDA", "CLIP", "VF_COEFF", "GRAD_CLIP", "HIDDEN")
    return "".join(f"{name} = {globals()[name]!r}\n" for name in names)


def run(script: str, seed: int, iterations: int) -> dict | None:
    """One system's run in a fresh process; None where it cannot run here."""
    with tempfile.TemporaryDirectory() as root:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", constants() + script, str(seed), root, str(iterations)],
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        wall = time.monotonic() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall_s"] = round(wall, 1)
    result["steps_per_s"] = round(result["env_steps"] / result["train_s"], 1)
    result["reached"] = result["return"] is not None and result["return"] >= TARGET
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-iterations", type=int, default=60)
    args = parser.parse_args()
    systems = {"forgeml": FORGEML, "bare_rllib": BARE_RLLIB, "stable_baselines3": STABLE_BASELINES3}
    runs = {name: [] for name in systems}
    for seed in args.seeds:
        for name, script in systems.items():
            result = run(script, seed, args.max_iterations)
            if result is not None:
                runs[name].append({"seed": seed, **result})
    summary = {}
    for name, results in runs.items():
        if results:
            summary[name] = {
                "median_wall_s": statistics.median(r["wall_s"] for r in results),
                "median_train_s": statistics.median(r["train_s"] for r in results),
                "median_steps_per_s": statistics.median(r["steps_per_s"] for r in results),
                "reached": sum(r["reached"] for r in results),
            }
    ratios = {
        f"forgeml_wall_over_{other}": round(
            summary["forgeml"]["median_wall_s"] / summary[other]["median_wall_s"], 2
        )
        for other in ("bare_rllib", "stable_baselines3")
        if "forgeml" in summary and other in summary
    }
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "target_return": TARGET,
                "summary": summary,
                "ratios": ratios,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
