"""From an experiment to RLlib's AlgorithmConfig: the one place forgeml's RL settings
meet RLlib's names."""

from __future__ import annotations

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.dqn import DQNConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.tune.registry import register_env

from forgeml.config import EnvConfig, ExperimentConfig


def register_environment(cfg: ExperimentConfig) -> None:
    """Register the experiment's environment with Ray under its name (the cluster's
    registry, which every env runner reads). RLlib's EnvContext
    carries nothing forgeml's environments take: their kwargs are in ``cfg.env``."""
    settings = cfg.env.model_dump()

    def create(_context):
        return EnvConfig(**settings).make()

    register_env(environment_name(cfg), create)


def environment_name(cfg: ExperimentConfig) -> str:
    return f"forgeml-{cfg.name}"


def algorithm_config(cfg: ExperimentConfig) -> AlgorithmConfig:
    """RLlib's config of the experiment's algorithm, env runners and networks. Policies
    act in [-1, 1] on continuous actions, which RLlib scales to the action space's
    bounds (``normalize_actions``); ``forgeml.rl.policy`` does the same when serving.

    A lost env runner fails the iteration, and Tune restores the run from its latest
    checkpoint (``train.max_failures``), as for a lost Ray Train worker: with RLlib's own
    restart, the only runner was taken out of service and the run trained on no samples
    until it ended (tests/integration/test_reinforcement.py)."""
    task, model, scaling = cfg.task, cfg.model, cfg.scaling
    algorithm = task.algorithm
    common = dict(lr=algorithm.lr, gamma=algorithm.gamma, grad_clip=algorithm.grad_clip)
    if algorithm.name == "ppo":
        config = PPOConfig().training(
            **common,
            lambda_=algorithm.gae_lambda,
            train_batch_size_per_learner=algorithm.train_batch_size,
            minibatch_size=algorithm.minibatch_size,
            num_epochs=algorithm.num_epochs,
            clip_param=algorithm.clip,
            entropy_coeff=algorithm.entropy_coeff,
            vf_loss_coeff=algorithm.vf_loss_coeff,
            vf_clip_param=algorithm.vf_clip or float("inf"),
        )
    else:
        start, end = algorithm.epsilon
        config = DQNConfig().training(
            **common,
            train_batch_size_per_learner=algorithm.train_batch_size,
            replay_buffer_config={
                "type": "PrioritizedEpisodeReplayBuffer",
                "capacity": algorithm.replay_capacity,
            },
            target_network_update_freq=algorithm.target_update_steps,
            epsilon=[(0, start), (algorithm.epsilon_steps, end)],
            n_step=algorithm.n_step,
            double_q=algorithm.double_q,
            dueling=algorithm.dueling,
        )
    return (
        config.environment(environment_name(cfg), normalize_actions=True, clip_actions=False)
        .env_runners(
            num_env_runners=scaling.num_workers,
            num_envs_per_env_runner=task.envs_per_runner,
            num_cpus_per_env_runner=scaling.cpus_per_worker,
        )
        .fault_tolerance(restart_failed_env_runners=False)
        .learners(num_gpus_per_learner=1 if scaling.use_gpu else 0)
        .rl_module(
            model_config=DefaultModelConfig(
                fcnet_hiddens=list(model.hidden),
                fcnet_activation=model.activation,
                vf_share_layers=model.share_value_layers,
            )
        )
        .debugging(seed=cfg.seed)
    )
