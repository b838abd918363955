import pytest
import torch
from forgeml.config import ClassificationTask as ClassificationConfig
from forgeml.config import CNNConfig
from forgeml.data.base import ModelInputs, TargetSpec
from forgeml.data.pipeline import PreparedData
from forgeml.data.tabular import TabularPreprocessor
from forgeml.models import build_model, registered_models
from forgeml.tasks import build_task


@pytest.mark.parametrize(("width", "depth", "size"), [(4, 1, 16), (8, 3, 32), (16, 4, 64)])
def test_cnn_output_shape(width, depth, size):
    model = build_model(
        CNNConfig(width=width, depth=depth), ModelInputs((1, size, size), "images"), 9
    )
    assert model(torch.zeros(5, 1, size, size)).shape == (5, 9)


def test_cnn_width_and_depth_change_capacity():
    small = build_model(CNNConfig(width=4, depth=2), ModelInputs((1, 32, 32), "images"), 9)
    large = build_model(CNNConfig(width=8, depth=3), ModelInputs((1, 32, 32), "images"), 9)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(large) > 4 * count(small)


def test_cnn_too_deep_for_input_names_the_field():
    with pytest.raises(ValueError, match="model.depth=5"):
        build_model(CNNConfig(depth=5), ModelInputs((1, 16, 16), "images"), 9)


def test_registry_lists_cnn():
    assert "cnn" in registered_models()


def test_classification_metrics_match_hand_computed_values():
    # 3 classes, 6 samples. Predictions (argmax): [0, 0, 1, 1, 2, 1], truth [0, 0, 1, 2, 2, 1].
    probs = torch.tensor(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.5, 0.4],
            [0.1, 0.2, 0.7],
            [0.3, 0.4, 0.3],
        ]
    )
    truth = torch.tensor([0, 0, 1, 2, 2, 1])
    task = build_task(ClassificationConfig(), TargetSpec(classes=("a", "b", "c")))
    metrics = task.test_metrics()
    metrics.update(probs, truth)
    report = task.report(metrics.compute())
    assert report["accuracy"] == pytest.approx(5 / 6)
    # per class precision: a 2/2, b 2/3, c 1/1; recall: a 2/2, b 2/2, c 1/2
    assert report["per_class_precision"] == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 1.0})
    assert report["per_class_recall"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.5})
    f1 = {"a": 1.0, "b": 0.8, "c": 2 / 3}
    assert report["per_class_f1"] == pytest.approx(f1)
    assert report["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert report["macro_precision"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert report["confusion_matrix"]["matrix"] == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    # one-vs-rest AUC: class a scores separate perfectly (1.0); class b: positives
    # {0.7, 0.4} vs negatives {0.1, 0.3, 0.5, 0.2} -> 7 of 8 pairs ordered = 0.875;
    # class c: positives {0.4, 0.7} vs negatives {0.1, 0.1, 0.1, 0.3} -> 1.0.
    assert report["auroc_ovr"] == pytest.approx((1.0 + 0.875 + 1.0) / 3)


def test_loss_is_cross_entropy_with_label_smoothing():
    task = build_task(ClassificationConfig(label_smoothing=0.1), TargetSpec(classes=("a", "b")))
    logits = torch.tensor([[2.0, 0.0]])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.1)
    assert task.loss(logits, torch.tensor([0])).item() == pytest.approx(expected.item())


def test_balanced_class_weights_come_from_the_training_rows_and_weigh_the_loss():
    target = TargetSpec(classes=("common", "rare"), name="y")
    data = PreparedData(
        *(None,) * 3,
        preprocessor=TabularPreprocessor([], [], "onehot", "y", target),
        sizes={},
        rejected={},
        augment=None,
        cached=True,
        seed=0,
        classes={"train": {"common": 80, "rare": 20}, "val": {}, "test": {}},
    )
    assert data.training_target(ClassificationConfig()) == target
    balanced = data.training_target(ClassificationConfig(class_weights="balanced"))
    assert balanced.class_weights == pytest.approx((100 / 160, 100 / 40))
    assert TargetSpec.from_dict(balanced.to_dict()) == balanced
    task = build_task(ClassificationConfig(class_weights="balanced"), balanced)
    logits, labels = torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(
        logits, labels, weight=torch.tensor(balanced.class_weights)
    )
    assert task.loss(logits, labels).item() == pytest.approx(expected.item())
