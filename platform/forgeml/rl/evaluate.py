"""Scoring a policy on held-out episodes: new environments seeded apart from training,
the policy acting greedily, many episodes stepped as one batch. A policy that acts at
random on the same seeds is the baseline."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from forgeml.config import EnvConfig

#: Added to the experiment's seed for the evaluation episodes; RLlib seeds its training
#: environments from the seed upwards, one per environment copy.
EVALUATION_SEED_OFFSET = 1_000_000
#: Environments stepped together.
PARALLEL_EPISODES = 32

Actor = Callable[[np.ndarray], np.ndarray]


def run_episodes(act: Actor, env: EnvConfig, episodes: int, seed: int) -> dict:
    """Returns, lengths and (where the environment reports ``is_success``) successes of
    ``episodes`` episodes, the i-th reset with seed ``seed + i``."""
    pool = [env.make() for _ in range(min(episodes, PARALLEL_EPISODES))]
    started = 0
    running: dict[int, dict] = {}

    def start(slot: int) -> None:
        nonlocal started
        observation, _ = pool[slot].reset(seed=seed + started)
        running[slot] = {"observation": observation, "return": 0.0, "length": 0}
        started += 1

    for slot in range(len(pool)):
        start(slot)
    returns, lengths, successes = [], [], []
    while running:
        slots = list(running)
        actions = act(np.stack([running[s]["observation"] for s in slots]))
        for slot, action in zip(slots, actions, strict=True):
            episode = running[slot]
            observation, reward, terminated, truncated, info = pool[slot].step(action)
            episode["observation"] = observation
            episode["return"] += float(reward)
            episode["length"] += 1
            if terminated or truncated:
                returns.append(episode["return"])
                lengths.append(episode["length"])
                if "is_success" in info:
                    successes.append(bool(info["is_success"]))
                del running[slot]
                if started < episodes:
                    start(slot)
    for environment in pool:
        environment.close()
    scores = {
        "episodes": episodes,
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "return_min": float(np.min(returns)),
        "return_max": float(np.max(returns)),
        "episode_length_mean": float(np.mean(lengths)),
        "returns": [round(r, 4) for r in returns],
    }
    if successes:
        scores["success_rate"] = float(np.mean(successes))
    return scores


def random_actor(env: EnvConfig, seed: int) -> Actor:
    """Uniformly random actions from the environment's action space, seeded."""
    made = env.make()
    space = made.action_space
    made.close()
    space.seed(seed)
    return lambda observations: np.stack([space.sample() for _ in observations])
