import numpy as np
from forgeml.data import wafer
from forgeml.data.images import ImageFeatures, ImagePreprocessor, decode_images
from forgeml.data.kinds import preprocessor_from_dict


def test_generator_is_deterministic_per_seed():
    a = wafer.generate(5, 24, seed=3)
    b = wafer.generate(5, 24, seed=3)
    c = wafer.generate(5, 24, seed=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])


def test_generator_is_class_balanced_and_uses_wm811k_codes():
    rows = wafer.generate(20, 32, seed=0)
    assert np.bincount(rows["label"]).tolist() == [20] * len(wafer.CLASS_NAMES)
    assert set(np.unique(rows["image"])) <= {wafer.OUTSIDE, wafer.GOOD, wafer.DEFECT}
    assert rows["image"].shape == (180, 32 * 32)


def _defect_share(label: str, n: int = 40, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(1)
    k = wafer.CLASS_NAMES.index(label)
    maps = np.stack([wafer.generate_map(k, size, rng) for _ in range(n)])
    inside = (maps != wafer.OUTSIDE).sum((1, 2))
    return (maps == wafer.DEFECT).sum((1, 2)) / inside


def test_pattern_densities_follow_their_definitions():
    assert _defect_share("none").max() < 0.08
    assert _defect_share("near-full").min() > 0.7
    random = _defect_share("random")
    assert 0.15 < random.mean() < 0.5


def test_edge_ring_defects_sit_on_the_rim_and_center_defects_in_the_middle():
    size, rng = 32, np.random.default_rng(2)
    y, x = np.mgrid[0:size, 0:size]
    r = np.hypot(y - (size - 1) / 2, x - (size - 1) / 2) / (size / 2)

    def mean_defect_radius(label):
        k = wafer.CLASS_NAMES.index(label)
        return np.mean(
            [r[wafer.generate_map(k, size, rng) == wafer.DEFECT].mean() for _ in range(30)]
        )

    assert mean_defect_radius("edge-ring") > 0.8
    assert mean_defect_radius("center") < 0.35


def test_maps_vary_within_a_class():
    rng = np.random.default_rng(0)
    k = wafer.CLASS_NAMES.index("scratch")
    maps = {wafer.generate_map(k, 32, rng).tobytes() for _ in range(20)}
    assert len(maps) == 20


def _features(size: int = 2) -> ImageFeatures:
    return ImageFeatures("sample_id", "image", "label", size, ("a", "b", "c"))


def test_preprocessor_standardises_with_fitted_moments_and_round_trips():
    images = np.array([[[0, 1], [2, 1]]], dtype=np.uint8)
    x = images.astype(np.float64)
    pre = ImagePreprocessor.from_moments(
        _features(), x.size, np.array([x.sum()]), np.array([(x**2).sum()])
    )
    assert pre.mean == (1.0,) and np.isclose(pre.std, np.sqrt(0.5)).all()
    out = pre.transform({"image": images, "label": np.array([2])})
    assert out["inputs"].shape == (1, 1, 2, 2) and out["inputs"].dtype == np.float32
    assert np.isclose(out["inputs"].mean(), 0) and np.isclose(out["inputs"].std(), 1)
    assert out["target"].tolist() == [2]
    assert preprocessor_from_dict(pre.to_dict()) == pre


def test_preprocessor_refuses_wrong_shapes():
    pre = ImagePreprocessor(image_size=4, mean=(1.0,), std=(1.0,), class_names=("a", "b"))
    try:
        pre.standardize(np.zeros((2, 3, 3), np.uint8))
    except ValueError as exc:
        assert "(N, 4, 4, 1)" in str(exc)
    else:
        raise AssertionError("a 3x3 map passed a 4x4 preprocessor")


def test_rows_with_wrong_sizes_or_labels_are_rejected_with_reasons():
    good, small = np.ones(4, np.uint8), np.ones(3, np.uint8)
    images = np.empty(5, dtype=object)
    images[:] = [good, small, good, good, None]
    batch = {
        "sample_id": np.arange(5),
        "image": images,
        "label": np.array([0, 1, 3, np.nan, 2]),
    }
    reasons = _features().reject_reasons(batch)
    assert reasons[0] == ""
    assert "expected 2x2 values" in reasons[1] and "expected 2x2 values" in reasons[4]
    assert reasons[2] == reasons[3] == "label: not a class index 0..2"


def test_decode_accepts_flat_and_object_columns():
    flat = np.arange(2 * 9, dtype=np.uint8).reshape(2, 9)
    objects = np.empty(2, dtype=object)
    objects[:] = [flat[0], flat[1]]
    np.testing.assert_array_equal(decode_images(objects, 3), flat.reshape(2, 3, 3, 1))
    np.testing.assert_array_equal(decode_images(flat, 3), flat.reshape(2, 3, 3, 1))
    raw = np.array([row.tobytes() for row in flat], dtype=object)
    np.testing.assert_array_equal(decode_images(raw, 3), flat.reshape(2, 3, 3, 1))
    np.testing.assert_array_equal(decode_images(flat, 1, channels=9), flat.reshape(2, 1, 1, 9))
    short = np.array([flat[0].tobytes(), flat[1].tobytes()[:5]], dtype=object)
    reasons = ImageFeatures(
        "sample_id", "image", "label", 3, ("a", "b"), max_value=255
    ).reject_reasons({"sample_id": np.arange(2), "image": short, "label": np.array([0, 1])})
    assert reasons.tolist() == ["", "image: expected 3x3 values per row"]
