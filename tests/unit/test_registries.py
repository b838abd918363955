"""Each config variant and its implementation are registered under one kind, and what a
variant states it can do is what its implementation does."""

from __future__ import annotations

import pytest
from forgeml.config import ModelConfig, TaskConfig, variants
from forgeml.data.preprocessing import TargetSpec
from forgeml.models import registered_models
from forgeml.tasks import build_task, registered_tasks

TARGET = TargetSpec(classes=("a", "b"), name="y", vocab_size=12, horizon=3)


def test_every_task_and_model_variant_has_an_implementation():
    assert registered_tasks() == sorted(variants(TaskConfig))
    assert registered_models() == sorted(variants(ModelConfig))


@pytest.mark.parametrize("kind", sorted(variants(TaskConfig)))
def test_a_task_reports_the_validation_metrics_its_config_states(kind):
    cfg = variants(TaskConfig)[kind]()
    task = build_task(cfg, TARGET)
    assert {f"val_{name}" for name in task.validation_metrics()} == set(cfg.metrics)


@pytest.mark.parametrize("kind", sorted(variants(TaskConfig)))
def test_a_task_offers_what_its_config_says_it_can_do(kind):
    cfg = variants(TaskConfig)[kind]()
    task = build_task(cfg, TARGET)
    assert hasattr(task, "prediction_records") == cfg.served
    assert hasattr(task, "sample_report") == cfg.draws_images
    assert hasattr(task, "generation_metrics") == cfg.writes_text
