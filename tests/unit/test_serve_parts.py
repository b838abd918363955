import base64
import io

import numpy as np
import pytest
from forgeml.config import AutoscalingConfig
from forgeml.data.images import ImagePreprocessor
from forgeml.serve.auth import TOKEN_ENV, TOKEN_FILE_ENV, read_token
from forgeml.serve.schemas import ImageInstance
from PIL import Image


def _png(array: np.ndarray, mode: str = "L") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_array_and_png_instances_decode_to_the_same_map():
    wafer = np.random.default_rng(0).integers(0, 3, (8, 8)).astype(np.uint8)
    from_array = ImageInstance(image=wafer.tolist()).to_array()
    from_png = ImageInstance(image_png_base64=_png(wafer)).to_array()
    from_rgb_png = ImageInstance(image_png_base64=_png(wafer, "RGB")).to_array()
    np.testing.assert_array_equal(from_array, wafer)
    np.testing.assert_array_equal(from_png, wafer)
    np.testing.assert_array_equal(from_rgb_png, wafer)


def test_a_wafer_model_refuses_values_above_its_die_codes_and_a_picture_model_takes_them():
    bright = ImageInstance(image_png_base64=_png(np.full((4, 4), 200, np.uint8)))
    wafer = ImagePreprocessor(image_size=4, mean=1.0, std=0.5, class_names=("a", "b"))
    with pytest.raises(ValueError, match="instances.0: values must be 0 to 2"):
        wafer.request_columns([bright])
    picture = ImagePreprocessor(
        image_size=4, mean=100.0, std=50.0, class_names=("a", "b"), max_value=255
    )
    assert picture.request_columns([bright])["image"].max() == 200


def test_token_from_environment_or_file(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert read_token(auth=False) is None
    with pytest.raises(ValueError, match="--no-auth"):
        read_token(auth=True)
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))
    assert read_token(auth=True) == "from-file"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(auth=True) == "from-env"


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ValueError, match="min_replicas \\(3\\) must be <= max_replicas \\(2\\)"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
