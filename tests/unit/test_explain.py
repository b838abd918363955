"""Explanations without Ray: Grad-CAM finds a defect whose place is known; a table's SHAP
values are exact for a linear model, add up to the output's change, move a feature's
columns together, and do not change between calls; a text's tokens are its features,
padding moves nothing, and a Transformer gives the empty text a finite output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from forgeml.config import CNNConfig
from forgeml.data.base import ModelInputs
from forgeml.explain import gradcam, shap_values, token_features, token_shap_values
from forgeml.models import build_model
from scipy.ndimage import binary_dilation

SIZE, DEFECT_SIDE = 24, 8
GOOD, DEFECT = 1, 2


def _maps(rng: np.random.Generator, count: int):
    """Standardised maps of good dies with 3% random failures; half hold a square defect
    at a random place. Returns the maps, labels (1: defect) and the defects' masks."""
    codes = np.full((count, 1, SIZE, SIZE), GOOD, np.float32)
    codes[rng.random(codes.shape) < 0.03] = DEFECT
    labels = rng.integers(0, 2, count)
    masks = np.zeros((count, SIZE, SIZE), bool)
    for i in np.flatnonzero(labels):
        row, col = rng.integers(0, SIZE - DEFECT_SIDE + 1, 2)
        masks[i, row : row + DEFECT_SIDE, col : col + DEFECT_SIDE] = True
    codes[:, 0][masks] = DEFECT
    return torch.from_numpy((codes - 1.1) / 0.3), torch.from_numpy(labels), masks


@pytest.fixture(scope="module")
def trained_cnn():
    """The platform's CNN, trained for three epochs to tell maps with a defect apart."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = CNNConfig(kind="cnn", width=8, depth=2, dropout=0.0)
    model = build_model(cfg, ModelInputs(shape=(1, SIZE, SIZE), data="images"), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    maps, labels, _ = _maps(rng, 2000)
    for _ in range(3):
        for start in range(0, len(maps), 64):
            loss = torch.nn.functional.cross_entropy(
                model(maps[start : start + 64]), labels[start : start + 64]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_gradcam_puts_most_of_its_mass_on_the_defect(trained_cnn):
    """On held-out maps with a defect, the Grad-CAM of class "defect" from the last
    convolution (12x12 here, upsampled to 24x24) lies mostly on the defect and the two
    dies around it, an area that holds a fifth of the map."""
    maps, labels, masks = _maps(np.random.default_rng(1), 300)
    with torch.no_grad():
        assert (trained_cnn(maps).argmax(1) == labels).float().mean() > 0.95
    defective = labels == 1
    heatmaps = gradcam(
        trained_cnn, maps[defective], torch.ones(int(defective.sum()), dtype=torch.long)
    )
    assert heatmaps.shape == (int(defective.sum()), SIZE, SIZE)
    assert np.allclose(heatmaps.sum((1, 2)), 1, atol=1e-4) and (heatmaps >= 0).all()
    regions = np.stack([binary_dilation(mask, iterations=2) for mask in masks[defective.numpy()]])
    inside = (heatmaps * regions).sum((1, 2))
    area = regions.mean((1, 2))
    assert inside.mean() > 0.5
    assert inside.mean() > 2.5 * area.mean()
    assert (inside > area).all()  # on every map, more than an even spread would put there


#: Four input columns making three features: the middle two are one feature (a one-hot
#: block, say).
GROUPS = np.array([0, 1, 1, 2])


def test_shap_values_of_a_linear_model_are_each_features_weighted_value():
    linear = torch.nn.Linear(4, 1)
    with torch.no_grad():
        linear.weight[:] = torch.tensor([[3.0, 1.0, -1.0, 2.0]])
        linear.bias[:] = 0.5
    rows = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))

    values = shap_values(lambda x: linear(x)[:, 0], rows, None, GROUPS)

    expected = torch.stack([3 * rows[:, 0], rows[:, 1] - rows[:, 2], 2 * rows[:, 3]], 1)
    np.testing.assert_allclose(values, expected.numpy(), atol=1e-5)


def test_shap_values_add_up_to_the_explained_outputs_change_and_repeat_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    rows = torch.randn(5, 4)
    classes = torch.tensor([0, 1, 2, 0, 1])

    values = shap_values(model, rows, classes, GROUPS)

    with torch.no_grad():
        moved = model(rows)[range(5), classes] - model(torch.zeros(1, 4))[0, classes]
    np.testing.assert_allclose(values.sum(1), moved.numpy(), atol=1e-5)
    np.testing.assert_array_equal(values, shap_values(model, rows, classes, GROUPS))


def test_the_bilstm_skips_padding_between_tokens_as_after_them():
    """What a text's SHAP values take away becomes padding in the middle of the text."""
    from forgeml.config.models import RNNConfig

    torch.manual_seed(0)
    inputs = ModelInputs(shape=(6,), data="text", dtype="int64", vocab_size=20)
    model = build_model(RNNConfig(kind="rnn"), inputs, 2).eval()
    with torch.no_grad():
        holed = model(torch.tensor([[3, 0, 5, 0, 9, 0]]))
        packed = model(torch.tensor([[3, 5, 9, 0, 0, 0]]))
    torch.testing.assert_close(holed, packed)


def test_a_texts_tokens_are_its_features_and_padding_one_more():
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]])

    assert token_features(ids).tolist() == [[0, 1, 2, 3, 3, 3], [0, 3, 3, 3, 3, 3]]


@pytest.mark.parametrize("kind", ["transformer", "rnn", "bag_of_ngrams"])
def test_token_shap_values_add_up_to_the_change_from_the_empty_text(kind):
    from forgeml.config.models import BagOfNgramsConfig, RNNConfig, TransformerConfig

    sections = {
        "transformer": TransformerConfig,
        "rnn": RNNConfig,
        "bag_of_ngrams": BagOfNgramsConfig,
    }
    torch.manual_seed(0)
    inputs = ModelInputs(shape=(12,), data="text", dtype="int64", vocab_size=40)
    model = build_model(sections[kind](kind=kind), inputs, 3).eval()
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0, :5] = torch.tensor([4, 9, 13, 21, 30])
    ids[1, :3] = torch.tensor([7, 7, 2])
    classes = torch.tensor([2, 0])

    values = token_shap_values(model, ids, classes)

    with torch.no_grad():
        moved = model(ids)[range(2), classes] - model(torch.zeros_like(ids))[range(2), classes]
    assert torch.isfinite(moved).all()
    np.testing.assert_allclose(values.sum(1), moved.numpy(), atol=1e-5)
    np.testing.assert_allclose(values[(ids == 0).numpy()], 0, atol=1e-6)  # padding moves nothing
    alone = token_shap_values(model, ids[1:], classes[1:])
    np.testing.assert_array_equal(values[1:], alone)  # the same beside another text or alone
