"""Checking a run report the way a person sees it: rendered by headless Chromium
(installed into .tools by `make tools`), every embedded image decodable and not blank,
nothing fetched from the network."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO

CHROMIUM = REPO / ".tools" / "chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
EMBEDDED = re.compile(r"""src=['"]data:image/png;base64,([^'"]+)['"]""")


def _colours(image: Image.Image) -> int:
    """How many distinct colours ``image`` has: each RGB pixel packed into one integer,
    since np.unique over rows of three takes seconds on a full-page screenshot."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint32)
    return len(np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]))


def _not_blank(image: Image.Image) -> bool:
    return np.asarray(image.convert("RGB"), dtype=np.float64).std() > 5 and _colours(image) > 16


def check_report(page: Path, tmp_path: Path, min_images: int) -> list[str]:
    """Assert that the report renders with its images; returns its section headings."""
    text = page.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", text), "a network resource"
    images = EMBEDDED.findall(text)
    assert len(images) >= min_images, f"{len(images)} images, expected {min_images} or more"
    for i, data in enumerate(images):
        assert _not_blank(Image.open(io.BytesIO(base64.b64decode(data)))), f"image {i} is blank"
    assert CHROMIUM.exists(), "chromium is missing: run `make tools`"
    shot = tmp_path / f"{page.stem}.png"
    subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    rendered = Image.open(shot)
    assert rendered.size == (1280, 2400)
    assert _not_blank(rendered), "the rendered page is blank"
    # The first screen holds the learning curves: far more colours than text alone.
    assert _colours(rendered) > 200
    return re.findall(r"<h2>(.*?)</h2>", text)
