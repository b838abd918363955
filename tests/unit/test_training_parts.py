import pytest
import torch
from forgeml.config import (
    CosineSchedule,
    EarlyStoppingConfig,
    OptimizerConfig,
    PlateauSchedule,
    StepSchedule,
)
from forgeml.train.early_stopping import EarlyStopping
from forgeml.train.optim import BatchPlan, LRSchedule, apply_hyperparameters, build_optimizer

# The schedules are stepped without training steps in between; torch warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


def _schedule(cfg, steps_per_epoch=10, max_epochs=5, mode="min"):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(OptimizerConfig(name="sgd", lr=1.0), [param])
    return LRSchedule(cfg, optimizer, steps_per_epoch, max_epochs, mode)


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    schedule = _schedule(CosineSchedule(warmup_epochs=1, min_lr_ratio=0.1))
    lrs = []
    for _ in range(50):
        lrs.append(schedule.lr)
        schedule.after_step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert schedule.lr == pytest.approx(0.1)


def test_step_schedule_decays_per_epoch_only():
    schedule = _schedule(StepSchedule(step_epochs=2, gamma=0.5))
    schedule.after_step()
    assert schedule.lr == 1.0
    for _ in range(4):
        schedule.after_epoch(0.0)
    assert schedule.lr == pytest.approx(0.25)


def test_plateau_reduces_when_the_metric_stalls():
    schedule = _schedule(PlateauSchedule(factor=0.5, patience=1), mode="max")
    for metric in (0.5, 0.6, 0.6, 0.6):
        schedule.after_epoch(metric)
    assert schedule.lr == pytest.approx(0.5)


def test_schedule_state_round_trips():
    first = _schedule(CosineSchedule())
    for _ in range(7):
        first.after_step()
    second = _schedule(CosineSchedule())
    second.load_state_dict(first.state_dict())
    first.after_step(), second.after_step()
    assert first.lr == pytest.approx(second.lr)


@pytest.mark.parametrize(
    "cfg", [CosineSchedule(warmup_epochs=0), StepSchedule(step_epochs=1, gamma=0.5)]
)
def test_a_restored_schedule_continues_relative_to_a_new_peak_lr(cfg):
    """What a PBT trial does when it continues from a checkpoint saved at another lr."""
    saved = _schedule(cfg)
    for _ in range(12):
        saved.after_step()
    saved.after_epoch(0.0)
    restored = _schedule(cfg)
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())
    restored.load_state_dict(saved.state_dict())
    restored.rescale(0.1)
    assert restored.lr == pytest.approx(0.1 * saved.lr)
    for _ in range(5):
        saved.after_step(), restored.after_step()
    saved.after_epoch(0.0), restored.after_epoch(0.0)
    assert restored.lr == pytest.approx(0.1 * saved.lr)


def test_restored_optimizer_takes_the_configured_decay_and_momentum():
    param = [torch.nn.Parameter(torch.zeros(1))]
    saved = build_optimizer(OptimizerConfig(name="sgd", momentum=0.5, weight_decay=0.1), param)
    restored = build_optimizer(OptimizerConfig(name="sgd"), param)
    restored.load_state_dict(saved.state_dict())
    apply_hyperparameters(restored, OptimizerConfig(name="sgd", momentum=0.8, weight_decay=0.01))
    assert restored.param_groups[0]["momentum"] == 0.8
    assert restored.param_groups[0]["weight_decay"] == 0.01


def test_adamw_and_sgd():
    param = [torch.nn.Parameter(torch.zeros(1))]
    assert isinstance(build_optimizer(OptimizerConfig(name="adamw"), param), torch.optim.AdamW)
    sgd = build_optimizer(OptimizerConfig(name="sgd", momentum=0.8), param)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8


def test_early_stopping_counts_patience_with_min_delta():
    stopper = EarlyStopping(EarlyStoppingConfig(mode="min", patience=2, min_delta=0.01))
    assert not stopper.update(1.0, 1)
    assert not stopper.update(0.995, 2)  # not better by min_delta
    assert stopper.update(0.999, 3)
    assert stopper.best == 1.0 and stopper.best_epoch == 1


def test_early_stopping_max_mode_and_disabled():
    stopper = EarlyStopping(EarlyStoppingConfig(mode="max", patience=1, enabled=False))
    stopper.update(0.5, 1)
    assert not stopper.update(0.4, 2)
    assert stopper.best == 0.5
    restored = EarlyStopping(stopper.cfg)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best == 0.5 and restored.epochs_without_improvement == 1


@pytest.mark.parametrize(
    ("max_workers", "world_size", "micro_batch", "accumulate"),
    [(1, 1, 32, 1), (2, 2, 32, 1), (2, 1, 32, 2), (4, 3, 22, 2), (3, 2, 24, 2), (8, 1, 32, 8)],
)
def test_every_world_size_steps_on_the_global_batch(
    max_workers, world_size, micro_batch, accumulate
):
    """train.batch_size 32 is one worker's batch at the largest size: fewer workers add
    up micro-batches no larger than it, to (about) the same global batch and so the same
    steps per epoch."""
    plan = BatchPlan.for_world(32, max_workers, world_size, train_rows=6400)
    largest = BatchPlan.for_world(32, max_workers, max_workers, train_rows=6400)
    assert (plan.micro_batch, plan.accumulate) == (micro_batch, accumulate)
    assert plan.micro_batch <= 32
    global_batch = plan.global_batch(world_size)
    assert 32 * max_workers <= global_batch < 32 * max_workers + world_size * accumulate
    assert abs(plan.steps_per_epoch - largest.steps_per_epoch) <= 1


def test_a_tiny_split_still_takes_one_step():
    assert BatchPlan.for_world(32, 4, 1, train_rows=3).steps_per_epoch == 1
