"""The tune section: bad search spaces are refused before any trial starts, naming the path."""

import math
import queue

import pytest
import ray
import ray.train
from forgeml.cli import EXIT_BAD_INPUT, main
from forgeml.config import config_from_dict
from forgeml.tune.search import EpochReportCallback, trial_config, trial_world_sizes

from tests.conftest import tiny_raw_config, write_config

LR = {"kind": "loguniform", "low": 1e-4, "high": 1e-2}


def _tune(tmp_path, capsys, tune_section):
    raw = tiny_raw_config(tmp_path / "store", tune=tune_section)
    code = main(["tune", "--config", str(write_config(tmp_path / "tune.yaml", raw))])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("tune_section", "message"),
    [
        (
            {"space": {"model.wdith": {"kind": "choice", "values": [4, 8]}}},
            "tune.space.model.wdith: not a config field",
        ),
        (
            {"space": {"train.max_epochs.value": {"kind": "choice", "values": [1]}}},
            "tune.space.train.max_epochs.value: train.max_epochs is a value, not a section",
        ),
        (
            {"space": {"model.width": {"kind": "choice", "values": []}}},
            "tune.space.model.width.values: List should have at least 1 item",
        ),
        (
            {"space": {"train.optimizer.lr": {"kind": "uniform", "low": 0.1, "high": 0.01}}},
            "tune.space.train.optimizer.lr: Value error, low (0.1) must be below high (0.01)",
        ),
        (
            {"space": {"train.optimizer.lr": {"kind": "uniform", "low": -1, "high": 1}}},
            "tune.space.train.optimizer.lr: Input should be greater than 0 (got -1.0)",
        ),
        (
            {"space": {"model.width": {"kind": "choice", "values": [8, "wide"]}}},
            "tune.space.model.width: Input should be a valid integer",
        ),
        (
            {"space": {"train.batch_size": {"kind": "uniform", "low": 32, "high": 256}}},
            "tune.space.train.batch_size: Input should be a valid integer",
        ),
        (
            {"space": {"data.augment.flip": {"kind": "choice", "values": [True, False]}}},
            "tune.space.data.augment.flip: cannot be searched",
        ),
        ({"metric": "val_auc", "space": {"train.optimizer.lr": LR}}, "tune.metric: Input"),
        ({"space": {}}, "tune.space: Dictionary should have at least 1 item"),
        (
            {"space": {"train.optimizer.lr": LR}, "search": {"kind": "grid"}},
            "search kind grid needs grid parameters only",
        ),
        (
            {"space": {"train.optimizer.lr": LR}, "scheduler": {"kind": "pbt"}},
            "tune.scheduler: pbt needs trial_mode in_process",
        ),
        (
            {
                "space": {"train.optimizer.lr": LR},
                "trial_mode": "in_process",
                "scheduler": {"kind": "pbt"},
            },
            "set search.kind to random or grid (got optuna_tpe)",
        ),
        (
            {
                "space": {"model.width": {"kind": "choice", "values": [4, 8]}},
                "trial_mode": "in_process",
                "search": {"kind": "random"},
                "scheduler": {"kind": "pbt"},
            },
            "tune.scheduler: pbt needs at least one of train.optimizer.lr",
        ),
        (
            {
                "space": {"scaling.cpus_per_worker": {"kind": "choice", "values": [1, 2]}},
                "trial_mode": "in_process",
            },
            "tune.space.scaling.cpus_per_worker: in_process trials all reserve",
        ),
        (
            {
                "space": {"train.optimizer.lr": LR},
                "scheduler": {"kind": "pbt", "quantile_fraction": 0.7},
            },
            "tune.scheduler.quantile_fraction: Input should be less than or equal to 0.5",
        ),
    ],
)
def test_bad_search_spaces_are_refused_before_ray_starts(tmp_path, capsys, tune_section, message):
    code, err = _tune(tmp_path, capsys, tune_section)
    assert code == EXIT_BAD_INPUT
    assert message in err
    assert not ray.is_initialized()


def test_a_config_without_a_tune_section_is_refused(tmp_path, capsys):
    config = write_config(tmp_path / "train.yaml", tiny_raw_config(tmp_path))
    assert main(["tune", "--config", str(config)]) == EXIT_BAD_INPUT
    assert "has no tune section" in capsys.readouterr().err


def test_trial_values_land_at_their_paths_and_the_tune_section_is_dropped(tmp_path):
    raw = tiny_raw_config(tmp_path, tune={"space": {"train.optimizer.lr": LR}})
    cfg = trial_config(raw, {"train.optimizer.lr": 0.003, "model.width": 12})
    assert cfg.train.optimizer.lr == 0.003 and cfg.model.width == 12
    assert cfg.tune is None
    assert cfg.train.max_epochs == raw["train"]["max_epochs"]


@pytest.mark.parametrize(
    ("searched", "sizes"),
    [
        (None, {2}),
        ({"kind": "choice", "values": [1, [3, 4]]}, {1, 2, 3, 4}),
        ({"kind": "int", "low": 2, "high": 5}, {2, 3, 4, 5}),
    ],
)
def test_a_search_cuts_shards_for_every_worker_count_its_trials_may_take(tmp_path, searched, sizes):
    """Shards are cut in the search's driver, before trials hold CPUs: for the base
    scaling and every value a searched scaling.num_workers can take."""
    space = {"train.optimizer.lr": LR, **({"scaling.num_workers": searched} if searched else {})}
    raw = tiny_raw_config(tmp_path, scaling={"num_workers": 2}, tune={"space": space})
    assert trial_world_sizes(config_from_dict(raw)) == sizes


def test_in_process_trials_refuse_more_than_one_worker(tmp_path, capsys):
    raw = tiny_raw_config(
        tmp_path / "store",
        scaling={"num_workers": 2},
        tune={"space": {"train.optimizer.lr": LR}, "trial_mode": "in_process"},
    )
    assert main(["tune", "--config", str(write_config(tmp_path / "t.yaml", raw))]) == EXIT_BAD_INPUT
    assert (
        "tune.trial_mode: in_process trials train on one worker, but scaling.num_workers is 2"
        in (capsys.readouterr().err)
    )
    assert not ray.is_initialized()


def test_train_trials_report_epochs_to_tune_and_not_preemption_checkpoints():
    """A checkpoint inside an epoch (a preemption notice) carries a NaN score; Tune sees
    only the epochs' reports, each with its checkpoint's path."""
    callback = object.__new__(EpochReportCallback)  # outside a Tune session
    callback._training_actor_item_queue = queue.Queue()
    checkpoint = ray.train.Checkpoint("/runs/trial/checkpoint_1")

    callback.after_report(None, [{"epoch": 3, "step": 12, "val_loss": math.nan}], checkpoint)
    callback.after_report(None, [{"epoch": 3, "val_loss": 0.5}], checkpoint)

    assert callback._training_actor_item_queue.get_nowait() == {
        "epoch": 3,
        "val_loss": 0.5,
        "checkpoint_path": "/runs/trial/checkpoint_1",
    }
    assert callback._training_actor_item_queue.empty()


@pytest.mark.parametrize(
    ("search", "planned"),
    [("grid", 6), ("random", 5 * 6)],  # a grid runs once; a random search per sample
)
def test_the_planned_trials_multiply_the_grid_parameters(search, planned):
    grid = {"kind": "grid", "values": [1e-2, 1e-3, 1e-4]}
    tune_section = {
        "num_trials": 5,
        "search": {"kind": search},
        "space": {"train.optimizer.lr": grid, "model.width": {"kind": "grid", "values": [4, 8]}},
    }
    cfg = config_from_dict(tiny_raw_config("unused", tune=tune_section))

    assert cfg.tune.planned_trials == planned
