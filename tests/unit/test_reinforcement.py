"""Reinforcement experiments without a cluster: the config's checks, a policy's package
round trip and its actions, and how held-out episodes are scored."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from forgeml.config import ConfigError, EnvConfig, config_from_dict
from forgeml.rl.evaluate import random_actor, run_episodes
from forgeml.rl.policy import Policy

CARTPOLE = {"name": "cartpole", "env": {"id": "CartPole-v1"}, "task": {"kind": "reinforcement"}}


def reinforcement(**sections) -> dict:
    return {**CARTPOLE, **sections}


def test_a_name_alone_selects_an_algorithm_and_the_policy_model_is_the_default():
    cfg = config_from_dict(reinforcement(task={"kind": "reinforcement", "algorithm": "dqn"}))
    assert cfg.task.algorithm.name == "dqn"
    assert cfg.task.algorithm.double_q
    assert cfg.model.kind == "policy_mlp"


def test_the_resolved_config_of_a_policy_loads_again():
    cfg = config_from_dict(reinforcement(train={"max_failures": 1}))
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (reinforcement(env={"id": "CartPole-v9"}), "did you mean CartPole-v1"),
        (reinforcement(env={"entry_point": "no_such_module:Env"}), "cannot import"),
        (reinforcement(env={}), "exactly one of id"),
        ({"name": "c", "task": {"kind": "reinforcement"}}, "env: task reinforcement learns in"),
        ({"name": "c", "env": {"id": "CartPole-v1"}}, "only task reinforcement"),
        (reinforcement(data={"cache": False}), "data: a reinforcement task learns in its env"),
        (reinforcement(model={"kind": "mlp"}), "needs model policy_mlp"),
        (reinforcement(train={"batch_size": 32}), "train.batch_size: a reinforcement run"),
        (reinforcement(scaling={"num_workers": [1, 2]}), "a fixed number of env runners"),
        (reinforcement(scaling={"placement_strategy": "SPREAD"}), "scaling.placement_strategy"),
        (
            reinforcement(
                task={"kind": "reinforcement", "algorithm": {"name": "dqn", "epsilon": [0.1, 0.5]}}
            ),
            "end <= start",
        ),
        (reinforcement(task={"kind": "reinforcement", "algorithm": "a3c"}), "'ppo', 'dqn'"),
    ],
)
def test_a_wrong_reinforcement_config_names_the_field_and_the_reason(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


@pytest.mark.parametrize(
    ("env", "algorithm"), [("CartPole-v1", "ppo"), ("CartPole-v1", "dqn"), ("Pendulum-v1", "ppo")]
)
def test_a_policy_survives_its_package_and_acts_in_its_action_space(env, algorithm):
    cfg = config_from_dict(
        reinforcement(env={"id": env}, task={"kind": "reinforcement", "algorithm": algorithm})
    )
    made = cfg.env.make()
    policy = Policy.build(cfg, made.observation_space, made.action_space)
    observations = np.stack([made.observation_space.sample() for _ in range(5)])
    acted = policy.act(observations)
    again = Policy.from_bytes(cfg, policy.to_bytes()).act(observations)
    for name, values in acted.items():
        np.testing.assert_allclose(values, again[name], rtol=1e-6)
    assert all(
        made.action_space.contains(a.astype(made.action_space.dtype)) for a in acted["actions"]
    )
    if algorithm == "dqn":
        assert acted["q_values"].shape == (5, made.action_space.n)
    elif policy.discrete:
        np.testing.assert_allclose(acted["probabilities"].sum(axis=1), 1, rtol=1e-5)
        assert (acted["actions"] == acted["probabilities"].argmax(axis=1)).all()


@pytest.mark.parametrize(
    ("observations", "reason"),
    [
        ([[0.0, 0.0, 0.0]], "an observation of CartPole-v1 has 4 values, not 3"),
        ([[0.0] * 4, [0.0] * 5], "observations have different lengths"),
        ([[0.0] * 4, [5.0, 0.0, 0.0, 0.0]], "observation 1 is outside the observation space"),
    ],
)
def test_observations_the_space_does_not_hold_are_refused_with_the_reason(observations, reason):
    cfg = config_from_dict(reinforcement())
    made = cfg.env.make()
    policy = Policy.build(cfg, made.observation_space, made.action_space)
    observation, _ = made.reset(seed=0)

    batch = policy.observation_batch([observation.tolist(), [0, 1, 0, -1]])

    assert batch.dtype == np.float32 and batch.shape == (2, 4)
    with pytest.raises(ValueError, match=reason):
        policy.observation_batch(observations)


def test_an_integer_observation_space_refuses_fractions():
    import gymnasium

    cfg = config_from_dict(reinforcement())
    space = gymnasium.spaces.Box(0, 9, (3,), np.int64)
    policy = Policy.build(cfg, space, gymnasium.spaces.Discrete(2))

    assert policy.observation_batch([[1, 2.0, 9]]).tolist() == [[1, 2, 9]]
    with pytest.raises(ValueError, match="observations have fractions; CartPole-v1's are integ"):
        policy.observation_batch([[1, 2.5, 9]])


def test_held_out_episodes_repeat_with_their_seeds_and_end_where_the_env_cuts_them():
    env = EnvConfig(id="CartPole-v1", max_episode_steps=20)
    first = run_episodes(random_actor(env, 7), env, episodes=40, seed=100)
    again = run_episodes(random_actor(env, 7), env, episodes=40, seed=100)
    assert first == again
    assert len(first["returns"]) == 40
    assert first["return_max"] <= 20 and first["episode_length_mean"] <= 20
    # CartPole pays 1 per step: a constant action tips the pole within a few steps.
    pushed = run_episodes(lambda obs: np.zeros(len(obs), dtype=np.int64), env, 5, seed=0)
    assert pushed["return_mean"] < first["return_mean"]
    assert "success_rate" not in first


def test_a_resumed_run_keeps_one_record_per_iteration_the_later():
    from types import SimpleNamespace

    import pandas as pd
    from forgeml.rl.train import _history

    # Tune's results of a run killed after iteration 3 and resumed from iteration 2.
    frame = pd.DataFrame(
        {
            "training_iteration": [1, 2, 3, 3, 4],
            "num_env_steps_sampled_lifetime": [100, 200, 300, 310, 410],
            "env_runners/episode_return_mean": [float("nan"), 20.0, 30.0, 31.0, 40.0],
            "env_runners/episode_len_mean": [float("nan"), 20.0, 30.0, 31.0, 40.0],
            "time_total_s": [1.0, 2.0, 3.0, 3.1, 4.1],
        }
    )
    history = _history(SimpleNamespace(metrics_dataframe=frame))
    assert [(r["epoch"], r["env_steps"]) for r in history] == [
        (1, 100),
        (2, 200),
        (3, 310),
        (4, 410),
    ]
    assert history[0]["episode_return_mean"] is None  # no episode had ended: not NaN in JSON


SEARCH = {"space": {"task.algorithm.lr": {"kind": "loguniform", "low": 1e-5, "high": 1e-2}}}


def test_a_policy_search_maximises_the_return():
    cfg = config_from_dict(reinforcement(tune=SEARCH))
    assert (cfg.tune.metric, cfg.tune.mode) == ("episode_return_mean", "max")
    named = config_from_dict(reinforcement(tune={**SEARCH, "metric": "episode_return_mean"}))
    assert named.tune.mode == "max"


def test_an_iteration_in_which_no_episode_ended_scores_nan_for_the_search():
    from forgeml.rl.search import with_return

    scored = {"env_runners": {"episode_return_mean": 20.0}, "training_iteration": 2}
    assert with_return({**scored})["env_runners"]["episode_return_mean"] == 20.0
    unscored = with_return({"env_runners": {}, "training_iteration": 1})
    assert np.isnan(unscored["env_runners"]["episode_return_mean"])


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"space": {"env.id": {"kind": "choice", "values": ["Acrobot-v1"]}}}, "tune.space.env.id"),
        ({"space": {"task.max_iterations": {"kind": "int", "low": 2, "high": 9}}}, "share env"),
        ({"space": {"task.algorithm.name": {"kind": "choice", "values": ["dqn"]}}}, "share env"),
        ({"space": {"task.algorithm.lr": {"kind": "uniform", "low": -1, "high": 1}}}, "than 0"),
        ({**SEARCH, "trial_mode": "train"}, "tune.trial_mode: a reinforcement search"),
        ({**SEARCH, "metric": "val_loss"}, "reinforcement reports episode_return_mean"),
        ({**SEARCH, "mode": "min"}, "tune.mode: a reinforcement search maximises"),
        (
            {**SEARCH, "search": {"kind": "random"}, "scheduler": {"kind": "pbt"}},
            "pbt is for the in_process trials of other tasks",
        ),
        ({"space": {"task.algorithm": {"kind": "choice", "values": ["dqn"]}}}, "share env"),
        ({"space": {"train.max_failures": {"kind": "int", "low": 0, "high": 3}}}, "share env"),
    ],
)
def test_a_policy_search_refuses_what_its_trials_cannot_vary(tune, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(reinforcement(tune=tune))


def test_each_trial_is_rllibs_algorithm_built_from_the_trials_values():
    from forgeml.rl.search import searched_algorithm
    from ray.rllib.algorithms.ppo import PPO

    runners = {"scaling.num_workers": {"kind": "int", "low": 1, "high": 4}}
    cfg = config_from_dict(reinforcement(tune={"space": {**SEARCH["space"], **runners}}))
    trial = searched_algorithm(cfg.resolved())
    assert issubclass(trial, PPO) and trial.__name__ == "PPO"
    # One bundle for the learner's process, one per env runner; Tune's own entries in a
    # trial's config are not values of the experiment's.
    values = {"scaling.num_workers": 3, "task.algorithm.lr": 0.01, "__trial_info__": None}
    assert len(trial.default_resource_request(values).bundles) == 4
    assert len(trial.default_resource_request({}).bundles) == 1 + cfg.scaling.num_workers


def test_a_policy_report_leaves_out_iterations_in_which_no_episode_ended():
    import re

    from forgeml.report import policy_report

    cfg = config_from_dict(reinforcement())
    record = {"epoch": 1, "env_steps": 100, "episode_return_mean": None, "time_s": 1.0}
    history = [
        {**record, "episode_length_mean": None},
        {**record, "epoch": 2, "env_steps": 200, "episode_return_mean": 30.0},
    ]
    history[1]["episode_length_mean"] = 30.0
    scores = {"returns": [10.0, 30.0], "return_mean": 20.0, "episodes": 2}
    metrics = {
        "run": {"name": "cartpole-1"},
        "status": "reached max_iterations",
        "history": history,
        "best_epoch": 2,
        "test": scores,
        "baseline": {
            "model": "a random policy",
            "test": {**scores, "returns": [9.0, 11.0], "return_mean": 10.0},
            "compared": [{"metric": "return_mean", "model": 20, "baseline": 10, "worse": False}],
            "warning": None,
        },
    }
    page = policy_report("cartpole:v1", cfg, metrics, "# card")
    assert re.findall(r"<h2>(.*?)</h2>", page) == [
        "Evaluation",
        "Baseline",
        "Training curves",
        "Evaluation returns",
        "Model card",
    ]
    assert page.count("data:image/png;base64,") == 2
    assert "scored on the same held-out episodes as the policy" in page
