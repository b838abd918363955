"""Feature selection and PCA from block moments, against scikit-learn on the same rows.

The statistics are merged block by block as Ray Data merges them; scikit-learn reads
the whole matrix at once.
"""

import numpy as np
import pytest
import torch
from forgeml.config import FeatureSelection, MLPConfig, PrincipalComponents
from forgeml.data.base import InputReduction, ModelInputs
from forgeml.data.reduction import Moments, f_scores, principal_components, select_columns
from forgeml.models import build_model
from sklearn.decomposition import PCA
from sklearn.feature_selection import VarianceThreshold, f_classif, f_regression


def _rows(seed: int = 0, rows: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six correlated columns with means far from zero (where a one-pass sum of squares
    loses digits), a constant column, three classes and a numeric target."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(rows, 3))
    mixing = rng.normal(size=(3, 6))
    x = latent @ mixing + rng.normal(scale=0.3, size=(rows, 6)) + 1e4
    x = np.concatenate([x, np.full((rows, 1), 7.0)], axis=1)
    classes = (latent[:, 0] > 0.5).astype(int) + (latent[:, 1] > 0).astype(int)
    target = 3 * latent[:, 0] - latent[:, 2] + rng.normal(scale=0.1, size=rows)
    return x, classes, target


def _moments(x: np.ndarray, y: np.ndarray, classes: bool, blocks: int = 7) -> dict:
    """``EncodedMoments``' result, merged over ``blocks`` uneven blocks."""
    columns = x if classes else np.concatenate([x, y[:, None]], axis=1)
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, len(x)), blocks - 1, replace=False))
    every, per_class = None, {}
    for part in np.split(np.arange(len(x)), cuts):
        block = Moments.of(columns[part], full=True)
        every = block if every is None else every.merged(block)
        if classes:
            for label in np.unique(y[part]):
                moments = Moments.of(columns[part][y[part] == label], full=False)
                known = per_class.get(label)
                per_class[label] = moments if known is None else known.merged(moments)
    return {"all": every, "classes": per_class}


def test_merged_block_moments_are_the_whole_matrix_s_mean_and_covariance():
    x, _, _ = _rows()
    every = _moments(x, np.zeros(len(x)), classes=True)["all"]

    assert every.rows == len(x)
    np.testing.assert_allclose(every.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(every.scatter / (len(x) - 1), np.cov(x.T), atol=1e-9)
    np.testing.assert_allclose(every.variance, x.var(0), atol=1e-9)


def test_f_scores_equal_scikit_learn_s_for_classes_and_for_numbers():
    x, classes, target = _rows()
    varied = x[:, :6]  # scikit-learn's F of a constant column is undefined too

    by_class = f_scores(_moments(varied, classes, classes=True), classes=3)
    by_number = f_scores(_moments(varied, target, classes=False), classes=0)

    np.testing.assert_allclose(by_class, f_classif(varied, classes)[0], rtol=1e-6)
    np.testing.assert_allclose(by_number, f_regression(varied, target)[0], rtol=1e-6)


def test_selection_keeps_what_variance_threshold_then_the_best_f_scores_keep():
    x, classes, _ = _rows()
    moments = _moments(x, classes, classes=True)
    names = [f"x{i}" for i in range(x.shape[1])]
    scores = f_scores(moments, classes=3)
    cfg = FeatureSelection(min_variance=0.0, top_k=3)

    selection = select_columns(cfg, names, moments["all"].variance, scores)

    kept = [i for i, column in enumerate(selection["columns"]) if column["kept"]]
    by_variance = VarianceThreshold(0.0).fit(x).get_support(indices=True)
    best = by_variance[np.argsort(-f_classif(x[:, by_variance], classes)[0])[:3]]
    assert kept == sorted(best.tolist())
    assert 6 not in kept and selection["columns"][6]["score"] < 0  # constant: ranked last
    assert selection["score"] == "f_test"


def test_selection_names_the_field_it_cannot_satisfy():
    variance, names = np.array([0.0, 1.0, 2.0]), ["a", "b", "c"]

    with pytest.raises(ValueError, match="top_k: 3 asked for, but only 2"):
        select_columns(FeatureSelection(min_variance=0.0, top_k=3), names, variance, variance)
    with pytest.raises(ValueError, match="min_variance: no column's variance is above 5"):
        select_columns(FeatureSelection(min_variance=5.0), names, variance, None)


@pytest.mark.parametrize("components", [3, 0.9])
def test_principal_components_equal_scikit_learn_s_pca(components):
    x, classes, _ = _rows()
    kept = list(range(6))
    fitted = principal_components(
        PrincipalComponents(components=components), _moments(x, classes, True)["all"], kept
    )
    reference = PCA(n_components=components, svd_solver="full").fit(x[:, kept])

    count = reference.n_components_
    assert len(fitted["components"]) == count
    np.testing.assert_allclose(
        fitted["explained_variance"], reference.explained_variance_, rtol=1e-9, atol=1e-6
    )
    np.testing.assert_allclose(
        fitted["explained_variance_ratio"][:count], reference.explained_variance_ratio_, atol=1e-6
    )
    ours, theirs = np.asarray(fitted["components"]), reference.components_
    signs = np.sign((ours * theirs).sum(1))
    np.testing.assert_allclose(ours * signs[:, None], theirs, atol=1e-6)
    np.testing.assert_allclose(fitted["mean"], reference.mean_, rtol=1e-12)


def test_too_many_components_name_the_field():
    x, classes, _ = _rows()
    with pytest.raises(ValueError, match="pca.components: 5 asked for, but the PCA reads 4"):
        principal_components(
            PrincipalComponents(components=5), _moments(x, classes, True)["all"], [0, 1, 2, 3]
        )


def test_a_reduced_model_reads_every_encoded_column_and_its_network_the_components():
    """The network behind a reduction is built for its width; the reduction is the
    preprocessing's, not a weight, so the state dict is the network's alone."""
    offset, matrix = [1.0, 2.0, 3.0], [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]
    inputs = ModelInputs(shape=(3,), data="tabular", reduction=InputReduction(offset, matrix))
    model = build_model(MLPConfig(hidden=[4]), inputs, 2).eval()

    rows = torch.tensor([[2.0, 5.0, 4.0], [1.0, -5.0, 3.0]])
    expected = model.network(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))

    torch.testing.assert_close(model(rows), expected)
    assert all(name.startswith("network.") for name in model.state_dict())
    assert ModelInputs.from_dict(inputs.to_dict()) == inputs
