"""A policy's model package: config.yaml, model.pt (the RLModule's weights and its
environment's spaces, no pickled code), metrics.json, MODEL_CARD.md and report.html
(``forgeml.report.policy_report``). There is no
preprocessor.json: RLlib's default networks read the observations as they are.
metrics.json has the keys of every package's; an epoch is a training iteration."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import forgeml
from forgeml.config import ExperimentConfig
from forgeml.model_package import package_config
from forgeml.rl.policy import Policy
from forgeml.storage import ModelRegistry


def policy_package(cfg: ExperimentConfig, policy: Policy, metrics: dict) -> dict[str, bytes]:
    """Serialise a policy; ``ModelRegistry.register`` writes the result atomically."""
    from forgeml.report import REPORT_FILE, policy_report  # plotting: not in serving replicas

    card = model_card(cfg, policy, metrics)
    return {
        "config.yaml": cfg.to_yaml().encode(),
        "model.pt": policy.to_bytes(),
        "metrics.json": json.dumps(metrics, indent=2).encode(),
        "MODEL_CARD.md": card.encode(),
        REPORT_FILE: policy_report(
            f"{cfg.name} ({metrics['run']['name']})", cfg, metrics, card
        ).encode(),
    }


def load_policy(registry: ModelRegistry, ref: str) -> tuple[Policy, dict]:
    """A registered policy (eval mode, CPU) and its metrics."""
    version = registry.resolve(ref)
    cfg = package_config(registry, version)
    if not cfg.task.acts:
        raise ValueError(f"{version.ref}: a {cfg.task.kind} model, not a policy")
    policy = Policy.from_bytes(cfg, registry.read(version, "model.pt"))
    return policy, json.loads(registry.read(version, "metrics.json"))


def model_card(cfg: ExperimentConfig, policy: Policy, metrics: dict) -> str:
    test, baseline, task = metrics["test"], metrics["baseline"]["test"], cfg.task
    success = f", success rate {test['success_rate']:.3f}" if "success_rate" in test else ""
    outputs = (
        "the action's probabilities"
        if policy.discrete and task.algorithm.name == "ppo"
        else "each action's Q-value"
        if policy.discrete
        else "no probabilities (the action is the Gaussian policy's mean)"
    )
    last = metrics["history"][-1]
    return f"""# {cfg.name}

Trained by forgeml {forgeml.__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

## What it is
A `{task.algorithm.name}` policy (RLlib, a `{cfg.model.kind}` of hidden layers
{cfg.model.hidden}) for the environment `{cfg.env.name}`{_kwargs(cfg)}.
Observation: {policy.observation_space}. Action: {policy.action_space}; the policy
acts greedily and also gives {outputs}.

## Training
{len(metrics["history"])} iterations, {last["env_steps"]} environment steps; stopped on
{metrics["status"]}. Registered: the checkpoint of iteration {metrics["best_epoch"]},
the best kept by the mean return of training episodes.

## Evaluation
{test["episodes"]} new episodes (seeds apart from training), acting greedily:
return {test["return_mean"]:.2f} ± {test["return_std"]:.2f} (min {test["return_min"]:.2f},
max {test["return_max"]:.2f}), episode length {test["episode_length_mean"]:.1f}{success}.
A random policy on the same episodes: return {baseline["return_mean"]:.2f} ±
{baseline["return_std"]:.2f}.

## Intended use and limits
- Acting in `{cfg.env.name}` as configured here; another version of the environment, other
  dynamics or other reward scales are a different problem.
- Observations are read as they are: a client must send them exactly as the environment
  returns them.
"""


def _kwargs(cfg: ExperimentConfig) -> str:
    return f" with {cfg.env.kwargs}" if cfg.env.kwargs else ""
