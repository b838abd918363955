"""The deployment that serves one registered policy.

``PolicyServer`` loads a policy package (``forgeml.rl``) and answers the gateway's
``act`` calls: observations are checked against the environment's observation space
one request at a time, then concurrent requests act as one batch (``@serve.batch``),
as ``ModelServer`` predicts. The policy acts greedily, as its evaluation did.
"""

import numpy as np
import torch
from ray import serve

from forgeml.config import StorageConfig
from forgeml.model_package import package_config
from forgeml.rl.package import load_policy
from forgeml.serve.metrics import batch_size_histogram
from forgeml.storage import ModelRegistry, Storage


@serve.deployment
class PolicyServer:
    """One registered policy version: its RLModule, batched greedy actions."""

    def __init__(self, ref: str, storage: dict, overrides: list[str]):
        registry = ModelRegistry(Storage(StorageConfig(**storage)))
        self.version = registry.resolve(ref)
        self.policy, _ = load_policy(registry, self.version.ref)
        cfg = package_config(registry, self.version, overrides).serve
        torch.set_num_threads(cfg.torch_threads)
        self.act_on_batch.set_max_batch_size(cfg.max_batch_size)
        self.act_on_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_sizes = batch_size_histogram(self.version)

    async def act(self, observations: list) -> dict:
        """The actions for one request's observations, or the reason they are not valid."""
        try:
            batch = self.policy.observation_batch(observations)
        except ValueError as exc:
            return {"error": str(exc)}
        return await self.act_on_batch(batch)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def act_on_batch(self, requests: list[np.ndarray]) -> list[dict]:
        """Each request's actions (and probabilities or Q-values), in one forward pass."""
        sizes = [len(observations) for observations in requests]
        self.batch_sizes.observe(sum(sizes))
        acted = self.policy.act(np.concatenate(requests))
        split = {key: np.split(values, np.cumsum(sizes)[:-1]) for key, values in acted.items()}
        return [{key: parts[i].tolist() for key, parts in split.items()} for i in range(len(sizes))]

    def ready(self) -> str:
        """This replica's policy ref, once it has loaded (the gateway's readiness probe)."""
        return self.version.ref
