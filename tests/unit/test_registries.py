"""Each config variant and its implementation are registered under one kind, and what a
variant states it can do is what its implementation does."""

from __future__ import annotations

import pytest
from forgeml.config import ModelConfig, TaskConfig, variants
from forgeml.data.base import ModelInputs, TargetSpec
from forgeml.models import build_model, registered_models
from forgeml.tasks import build_task, registered_tasks
from torch import nn

#: A small input of each kind of data: its shape and dtype.
INPUTS = {
    "images": ((1, 16, 16), "float32"),
    "tabular": ((5,), "float32"),
    "text": ((8,), "int64"),
    "series": ((8, 2), "float32"),
    "corpus": ((8,), "int64"),
    "text_pair": ((2, 8), "int64"),
}
#: Image generators read maps of value codes.
CODE_MAPS = ModelInputs((16, 16), "images", "int64", vocab_size=3)
TARGET = TargetSpec(classes=("a", "b"), name="y", vocab_size=12, horizon=3)


#: Tasks that learn from data, and the models forgeml builds for them; a task that acts
#: in an environment and its policy networks are RLlib's (``forgeml.rl``).
SUPERVISED_TASKS = sorted(k for k, t in variants(TaskConfig).items() if not t.acts)
ACTING = {k for k, t in variants(TaskConfig).items() if t.acts}
BUILT_MODELS = sorted(k for k, m in variants(ModelConfig).items() if m.made_for not in ACTING)


def test_every_task_and_model_variant_has_an_implementation():
    assert registered_tasks() == SUPERVISED_TASKS
    assert registered_models() == BUILT_MODELS


@pytest.mark.parametrize("kind", BUILT_MODELS)
def test_a_model_builds_for_every_kind_of_data_its_config_says_it_reads(kind):
    cfg = variants(ModelConfig)[kind]()
    for data in cfg.reads:
        shape, dtype = INPUTS[data]
        inputs = ModelInputs(shape, data, dtype, vocab_size=12)
        if cfg.made_for in ("vae", "gan"):
            inputs = CODE_MAPS
        outputs = 12 if cfg.made_for == "language_model" else 3
        assert isinstance(build_model(cfg, inputs, outputs), nn.Module)
    unread = next(d for d in INPUTS if d not in cfg.reads)
    with pytest.raises(ValueError, match=f"model {kind} reads .* data, not {unread}"):
        build_model(cfg, ModelInputs(*INPUTS[unread][:1], unread), 3)


@pytest.mark.parametrize("kind", SUPERVISED_TASKS)
def test_a_task_reports_the_validation_metrics_its_config_states(kind):
    cfg = variants(TaskConfig)[kind]()
    task = build_task(cfg, TARGET)
    assert {f"val_{name}" for name in task.validation_metrics()} == set(cfg.metrics)


@pytest.mark.parametrize("kind", SUPERVISED_TASKS)
def test_a_task_offers_what_its_config_says_it_can_do(kind):
    cfg = variants(TaskConfig)[kind]()
    task = build_task(cfg, TARGET)
    assert hasattr(task, "prediction_records") == cfg.served
    assert hasattr(task, "sample_report") == cfg.draws_images
    assert hasattr(task, "generation_metrics") == cfg.writes_text
