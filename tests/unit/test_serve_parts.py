import base64
import io

import numpy as np
import pytest
from forgeml.config import AutoscalingConfig
from forgeml.serve.app import TOKEN_ENV, TOKEN_FILE_ENV, read_token
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


def test_png_pixels_must_be_die_codes():
    with pytest.raises(ValueError, match="die codes 0, 1 or 2"):
        ImageInstance(image_png_base64=_png(np.full((4, 4), 200, np.uint8))).to_array()


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
