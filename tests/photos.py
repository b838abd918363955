"""Colour pictures for the image tests: shapes whose class is their colour alone, in
colours of one grey level, written as the image files users bring."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: A red, a green and a blue of the same grey level (138, as PIL's L mode and forgeml's
#: grey reader make it): the class of a picture is its shape's colour, which grey levels
#: do not show.
ISOLUMINANT = {"red": (240, 95, 95), "green": (58, 193, 62), "blue": (117, 126, 255)}


def coloured_shapes(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """24x24 RGB pictures of a disc or a square of random size and place on a grey
    background with noise; the colour of the shape is the class, the shape is not."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(ISOLUMINANT)), per_class)
    rows, columns = np.mgrid[:24, :24]
    pictures = []
    for label in labels:
        picture = np.full((24, 24, 3), 128.0) + rng.normal(0, 6, (24, 24, 1))
        radius, (y, x) = rng.uniform(4, 8), rng.uniform(7, 17, 2)
        if rng.random() < 0.5:
            shape = (rows - y) ** 2 + (columns - x) ** 2 <= radius**2
        else:
            shape = (np.abs(rows - y) <= radius) & (np.abs(columns - x) <= radius)
        picture[shape] = list(ISOLUMINANT.values())[label]
        pictures.append(np.clip(np.round(picture), 0, 255).astype(np.uint8))
    return np.stack(pictures), labels


def photo_folder(root, per_class: int = 60) -> dict:
    """The pictures as PNG, JPEG and RGBA PNG files (every third of each), one folder a
    colour, and a file that is not an image; the source of a config that reads them."""
    images, labels = coloured_shapes(per_class)
    names = list(ISOLUMINANT)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if i % 3 == 0:
            picture.save(folder / f"{i}.jpg", quality=95)
        elif i % 3 == 1:
            picture.convert("RGBA").save(folder / f"{i}.png")
        else:
            picture.save(folder / f"{i}.png")
    (root / names[0] / "broken.png").write_bytes(b"not a png")
    return {"kind": "image_folder", "path": str(root), "image_size": 16, "channels": 3}
