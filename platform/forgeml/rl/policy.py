"""A trained policy outside RLlib's Algorithm: the RLModule rebuilt from the package's
config, spaces and weights, acting greedily on a batch of observations. Evaluation and
serving both act through it, so what is scored is what is served."""

from __future__ import annotations

import io
from dataclasses import dataclass

import gymnasium
import numpy as np
import torch
from ray.rllib.core import Columns
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.utils.serialization import gym_space_from_dict, gym_space_to_dict
from ray.rllib.utils.spaces.space_utils import unsquash_action

from forgeml.config import ExperimentConfig
from forgeml.rl.algorithm import algorithm_config

#: Version of a policy's model.pt layout.
POLICY_FORMAT = 1


def supported_spaces(observation: gymnasium.Space, action: gymnasium.Space) -> str | None:
    """Why RLlib's default networks cannot take these spaces, or None where they can:
    flat Box observations, and Discrete or flat Box actions."""
    if not (isinstance(observation, gymnasium.spaces.Box) and len(observation.shape) == 1):
        return f"observations must be a flat Box (got {observation})"
    if isinstance(action, gymnasium.spaces.Discrete):
        return None
    if isinstance(action, gymnasium.spaces.Box) and len(action.shape) == 1:
        return None
    return f"actions must be Discrete or a flat Box (got {action})"


@dataclass
class Policy:
    """An RLModule and its environment's spaces."""

    cfg: ExperimentConfig
    module: RLModule
    observation_space: gymnasium.spaces.Box
    action_space: gymnasium.Space

    @classmethod
    def build(
        cls,
        cfg: ExperimentConfig,
        observation_space: gymnasium.Space,
        action_space: gymnasium.Space,
        state_dict: dict | None = None,
    ) -> Policy:
        spec = algorithm_config(cfg).get_rl_module_spec()
        spec.observation_space, spec.action_space = observation_space, action_space
        module = spec.build()
        if state_dict is not None:
            module.load_state_dict(state_dict)
        module.eval()
        return cls(cfg, module, observation_space, action_space)

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, gymnasium.spaces.Discrete)

    def to_bytes(self) -> bytes:
        """model.pt: the weights and the spaces, without pickled code."""
        buffer = io.BytesIO()
        torch.save(
            {
                "format": POLICY_FORMAT,
                "state_dict": self.module.state_dict(),
                "observation_space": gym_space_to_dict(self.observation_space),
                "action_space": gym_space_to_dict(self.action_space),
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, cfg: ExperimentConfig, data: bytes) -> Policy:
        stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return cls.build(
            cfg,
            gym_space_from_dict(stored["observation_space"]),
            gym_space_from_dict(stored["action_space"]),
            stored["state_dict"],
        )

    def observation_batch(self, observations: list) -> np.ndarray:
        """``observations`` (lists of numbers, as a client sends them) as the batch the
        policy acts on; ValueError with the reason where the observation space does not
        hold them (a wrong length, fractions for an integer space, a value out of bounds)."""
        space = self.observation_space
        try:
            values = np.asarray(observations, dtype=np.float64)
        except ValueError:
            raise ValueError("observations have different lengths") from None
        if values.shape[1:] != space.shape:
            raise ValueError(
                f"an observation of {self.cfg.env.name} has {space.shape[0]} values, "
                f"not {values.shape[1]}"
            )
        if np.issubdtype(space.dtype, np.integer) and not np.all(values == np.round(values)):
            raise ValueError(f"observations have fractions; {self.cfg.env.name}'s are integers")
        batch = values.astype(space.dtype)
        outside = ~np.all((batch >= space.low) & (batch <= space.high), axis=1)
        if outside.any():
            first = int(np.argmax(outside))
            raise ValueError(f"observation {first} is outside the observation space {space}")
        return batch

    @torch.no_grad()
    def act(self, observations: np.ndarray) -> dict[str, np.ndarray]:
        """Greedy actions for a batch of observations, in the environment's units, with
        the action probabilities (discrete PPO) or Q-values (DQN) behind them."""
        batch = {Columns.OBS: torch.as_tensor(observations, dtype=torch.float32)}
        if self.cfg.task.algorithm.name == "dqn":
            q_values = self.module.compute_q_values(batch)["qf_preds"]
            return {"actions": q_values.argmax(-1).numpy(), "q_values": q_values.numpy()}
        inputs = self.module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        dist = self.module.get_inference_action_dist_cls().from_logits(inputs)
        actions = dist.to_deterministic().sample().numpy()
        if self.discrete:
            return {"actions": actions, "probabilities": torch.softmax(inputs, -1).numpy()}
        return {"actions": unsquash_action(actions, self.action_space)}
